"""Benchmark one fused pattern at a time: eager, Inductor, Inductor max-autotune, Liger, autokernel, floor.

Usage (device machine)::

    python benchmarks/bench_patterns.py --patterns rms_norm [--shapes 8192x8192,2048x1024]
        [--impls eager,inductor,inductor-max-autotune,liger,autokernel] [--passes fwd,fwd+bwd]
        [--tune [--tune-budget MIN]] [--cache-dir DIR] [--out benchmarks/results] [--smoke]

Writes ``<out>/<pattern>.json`` in the format of ``BENCH_FORMAT.md`` and ``<out>/<pattern>.md`` (a table,
one line per case and pass), then prints the table. ``--smoke`` runs tiny shapes on the CPU, timed with
``time.perf_counter`` (medians of a few runs), writing to a temporary folder unless ``--out`` is given:
it tests the plumbing, not the speed. ``autokernel`` is imported only when the autokernel impl (or
``--tune``) is asked for, so the peers can be timed without it.

Floor = bytes that must cross DRAM / measured copy bandwidth (device-to-device copy of 1 GiB, read+write).
The autokernel rows say ``"cache": "hit"`` only when ``autokernel.explain`` reports every instance hit;
on a miss they time Inductor's fallback, and the table marks them ``(miss)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_e2e  # the results header: this script runs from benchmarks/, which is then on sys.path
import torch

REPO = Path(__file__).resolve().parent.parent
ALL_IMPLS = ("eager", "inductor", "inductor-max-autotune", "liger", "cce", "cce-compile", "autokernel",
             "inductor-cudagraphs", "autokernel-cudagraphs")
# mode="reduce-overhead": replays CUDA graphs, so host-side launch cost drops out of the time for both.
CUDAGRAPH_IMPLS = ("inductor-cudagraphs", "autokernel-cudagraphs")
# Peers that exist for some patterns only (a spec's other_peers): the others get no row for them.
OTHER_PEERS = ("cce", "cce-compile")
PEERS = ("eager", "inductor", "inductor-max-autotune", "liger", *OTHER_PEERS)
SMOKE_SKIP = ("liger", "inductor-max-autotune", *OTHER_PEERS)
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |out - ref| / max |ref| an impl may show against eager, per dtype
CHECK_TOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
ROTATE_BYTES = 100e6  # rotate input sets until they cover this many bytes (H100 L2 is 50 MB)
MAX_SETS = 64


# ------------------------------------------------------------------------------------------ patterns
RMS_EPS = 1e-6


def rms_norm_hf(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """RMSNorm as HF transformers' LlamaRMSNorm writes it (eps 1e-6)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    v = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(v + RMS_EPS)
    return w * h.to(dtype)


def rms_norm_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, n = shape
    x = torch.randn(m, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    w = torch.randn(n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return [x, w]


def rms_norm_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return (m * n + m * n + n) * itemsize  # read x, write y, read w


def rms_norm_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    bwd = (m * n + m * n + m * n + n + n) * itemsize  # read x, read dy, write dx, read w, write dw
    return rms_norm_bytes_fwd(shape, itemsize) + bwd


def rms_norm_liger() -> Callable[..., Any]:
    from liger_kernel.transformers.functional import liger_rms_norm

    # (X, W, eps, offset, casting_mode, in_place): in_place=False keeps dy intact across steps
    return lambda x, w: liger_rms_norm(x, w, RMS_EPS, 0.0, "llama", False)


def swiglu_silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part as HF Llama's MLP writes it: ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return torch.nn.functional.silu(gate) * up


def swiglu_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, n = shape  # [tokens, intermediate] of gate (and up)
    gate = torch.randn(m, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    up = torch.randn(m, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return [gate, up]


def swiglu_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return 3 * m * n * itemsize  # read gate and up, write y


def swiglu_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    # bwd: read gate, up and dy, write dgate and dup (the activation recomputed, not saved)
    return swiglu_bytes_fwd(shape, itemsize) + 5 * m * n * itemsize


def swiglu_liger() -> Callable[..., Any]:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, as attention and most models write it."""
    return torch.nn.functional.softmax(x, dim=-1)


def softmax_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, n = shape
    # Spread like attention scores, so the max shift and the exp both matter.
    return [(4 * torch.randn(m, n, generator=gen, dtype=torch.float32)).to(device=device, dtype=dtype)]


def softmax_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return 2 * m * n * itemsize  # read x, write y


def softmax_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return softmax_bytes_fwd(shape, itemsize) + 3 * m * n * itemsize  # bwd: read y and dy, write dx


def softmax_liger() -> Callable[..., Any]:
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply


def cross_entropy_hf(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy as HF's causal-LM loss computes it: float32 from bf16 logits, ignore_index -100, mean."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)


def cross_entropy_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, n = shape
    logits = (2 * torch.randn(m, n, generator=gen, dtype=torch.float32)).to(device=device, dtype=dtype)
    labels = torch.randint(0, n, (m,), generator=gen)
    labels[::16] = -100  # a few ignored tokens (padding, prompt)
    return [logits, labels.to(device)]


def cross_entropy_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return m * n * itemsize + 8 * m  # read the logits and the int64 labels


def cross_entropy_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return cross_entropy_bytes_fwd(shape, itemsize) + m * n * itemsize  # write the logits' gradient


def cross_entropy_liger() -> Callable[..., Any]:
    from liger_kernel.transformers.functional import liger_cross_entropy

    # Liger takes the bf16 logits and computes in float32 itself (what its HF patch does).
    return lambda logits, labels: liger_cross_entropy(logits, labels, ignore_index=-100)


LN_EPS = 1e-5


def layer_norm_eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm as nn.LayerNorm runs it (eps 1e-5, weight and bias)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def layer_norm_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, n = shape
    x = torch.randn(m, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float32)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(n, generator=gen, dtype=torch.float32)).to(device=device, dtype=dtype)
    return [x, w, b]


def layer_norm_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return (m * n + m * n + 2 * n) * itemsize  # read x, write y, read w and b


def layer_norm_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    bwd = (3 * m * n + 3 * n) * itemsize  # read x and dy, write dx; read w, write dw and db
    return layer_norm_bytes_fwd(shape, itemsize) + bwd


def layer_norm_liger() -> Callable[..., Any]:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, LN_EPS)


def add_rms_norm_hf(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's edge: the residual sum, normalized, and carried on."""
    h = x + residual
    return rms_norm_hf(h, w), h


def add_rms_norm_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    x, w = rms_norm_inputs(shape, dtype, device, gen)
    residual = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return [x, residual, w]


def add_rms_norm_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    return (4 * m * n + n) * itemsize  # read x and residual, write y and h, read w


def add_rms_norm_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, n = shape
    # bwd: read h, dy and dh, write dx (also the residual's gradient), read w, write dw
    return add_rms_norm_bytes_fwd(shape, itemsize) + (4 * m * n + 2 * n) * itemsize


def add_rms_norm_liger() -> Callable[..., Any]:
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

    return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, RMS_EPS, 0.0, "llama", False)


ROPE_KV_HEADS = 8  # k's heads in the rope cases (GQA); q's are the case's second dim


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_hf(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's apply_rotary_pos_emb: cos/sin [B, S, D] unsqueezed over the heads, rotate_half."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    b, h, s, d = shape  # q's [B, heads, S, head_dim]; k has ROPE_KV_HEADS heads
    # As HF makes them: view(B, S, H, D).transpose(1, 2), strided views of the projections' outputs
    q = torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, ROPE_KV_HEADS, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    pos = torch.randint(0, 4 * s, (b, s), generator=gen).double()
    ang = pos[..., None] / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat((ang, ang), dim=-1)
    return [q, k, emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)]


def rope_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    b, h, s, d = shape
    qk = b * (h + ROPE_KV_HEADS) * s * d
    return (2 * qk + 2 * b * s * d) * itemsize  # read q and k, write both outputs, read cos and sin


def rope_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    # bwd: read both outputs' grads, cos and sin, write dq and dk (q and k themselves are not needed)
    return 2 * rope_bytes_fwd(shape, itemsize)


def rope_liger() -> Callable[..., Any]:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb


def linear_cross_entropy_hf(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """An lm_head and its loss as HF's causal LMs compute them: bf16 logits, upcast, ignore_index -100, mean."""
    return torch.nn.functional.cross_entropy((h @ w.T).float(), labels)


def linear_cross_entropy_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    m, k, v = shape  # tokens, hidden, vocab (case "8192x4096->128256")
    h = torch.randn(m, k, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    w = (torch.randn(v, k, generator=gen, dtype=torch.float32) * 2 / k**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (m,), generator=gen)
    labels[::16] = -100
    return [h, w, labels.to(device)]


def linear_cross_entropy_bytes_fwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, k, v = shape
    return (m * k + v * k) * itemsize + 8 * m  # read h, W and the labels (the pass is compute-bound)


def linear_cross_entropy_bytes_fwd_bwd(shape: tuple[int, ...], itemsize: int) -> int:
    m, k, v = shape
    return linear_cross_entropy_bytes_fwd(shape, itemsize) + (m * k + v * k) * itemsize  # write dh and dW


def linear_cross_entropy_liger() -> Callable[..., Any]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda h, w, labels: loss(w, h, labels)


def linear_cross_entropy_cce(impl: str) -> Callable[[], Callable[..., Any]]:
    """Cut Cross-Entropy (Apple's ``cut-cross-entropy``) with ``impl`` "cce" (its Triton kernels, with its
    default gradient filter) or "torch_compile" (its torch.compile'd chunked loss)."""

    def factory() -> Callable[..., Any]:
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, labels: linear_cross_entropy(h, w, labels, ignore_index=-100, impl=impl)

    return factory


@dataclass(frozen=True)
class PatternSpec:
    eager: Callable[..., Any]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device, torch.Generator], list[torch.Tensor]]
    grad_inputs: tuple[int, ...]  # indices of the inputs that get gradients in fwd+bwd
    bytes_fwd: Callable[[tuple[int, ...], int], int]
    bytes_fwd_bwd: Callable[[tuple[int, ...], int], int]
    liger: Callable[[], Callable[..., Any]] | None  # factory; imports lazily
    shapes: tuple[str, ...]
    smoke_shapes: tuple[str, ...]
    dtype: str = "bf16"
    notes: dict[str, str] = field(default_factory=dict)
    # ak-tune's --pattern/--flags for this spec when they are not just its name (add_rms_norm is a variant
    # of the rms_norm family)
    tune_args: tuple[str, ...] = ()
    # more peers for this pattern alone (names from OTHER_PEERS): factories, imported lazily
    other_peers: dict[str, Callable[[], Callable[..., Any]]] = field(default_factory=dict)


PATTERNS: dict[str, PatternSpec] = {
    "rms_norm": PatternSpec(
        eager=rms_norm_hf,
        make_inputs=rms_norm_inputs,
        grad_inputs=(0, 1),
        bytes_fwd=rms_norm_bytes_fwd,
        bytes_fwd_bwd=rms_norm_bytes_fwd_bwd,
        liger=rms_norm_liger,
        shapes=("8192x8192", "8192x4096", "2048x1024", "2048x4096", "2048x8192", "2048x16384", "2048x32768"),
        smoke_shapes=("4x32",),
        notes={
            "eager": "HF LlamaRMSNorm, eps 1e-6",
            "liger": "liger_rms_norm(x, w, eps, 0.0, 'llama', False)",
        },
    ),
    "add_rms_norm": PatternSpec(
        eager=add_rms_norm_hf,
        make_inputs=add_rms_norm_inputs,
        grad_inputs=(0, 1, 2),
        bytes_fwd=add_rms_norm_bytes_fwd,
        bytes_fwd_bwd=add_rms_norm_bytes_fwd_bwd,
        liger=add_rms_norm_liger,
        shapes=("8192x4096", "8192x8192", "2048x4096"),
        smoke_shapes=("4x32",),
        notes={
            "eager": "h = x + residual; (HF LlamaRMSNorm(h), h), eps 1e-6",
            "liger": "LigerFusedAddRMSNormFunction.apply(x, residual, w, eps, 0.0, 'llama', False)",
        },
        tune_args=("--pattern", "rms_norm", "--flags", "residual=1"),
    ),
    "swiglu": PatternSpec(
        eager=swiglu_silu,
        make_inputs=swiglu_inputs,
        grad_inputs=(0, 1),
        bytes_fwd=swiglu_bytes_fwd,
        bytes_fwd_bwd=swiglu_bytes_fwd_bwd,
        liger=swiglu_liger,
        shapes=("8192x14336", "8192x11008", "4096x8192"),
        smoke_shapes=("4x48",),
        notes={
            "eager": "F.silu(gate) * up (HF LlamaMLP's elementwise part); shape = [tokens, intermediate] of gate",
            "liger": "LigerSiLUMulFunction.apply(gate, up); its backward writes the grads into the saved inputs",
        },
    ),
    "softmax": PatternSpec(
        eager=softmax_last,
        make_inputs=softmax_inputs,
        grad_inputs=(0,),
        bytes_fwd=softmax_bytes_fwd,
        bytes_fwd_bwd=softmax_bytes_fwd_bwd,
        liger=softmax_liger,
        shapes=("8192x8192", "4096x256", "4096x1024", "4096x4096", "4096x16384", "4096x32768"),
        smoke_shapes=("4x40",),
        notes={
            "eager": "F.softmax(x, dim=-1), x = 4 * randn",
            "liger": "LigerSoftmaxFunction.apply(x)",
        },
    ),
    "cross_entropy": PatternSpec(
        eager=cross_entropy_hf,
        make_inputs=cross_entropy_inputs,
        grad_inputs=(0,),
        bytes_fwd=cross_entropy_bytes_fwd,
        bytes_fwd_bwd=cross_entropy_bytes_fwd_bwd,
        liger=cross_entropy_liger,
        shapes=("8192x32000", "8192x128256", "4096x32000"),
        smoke_shapes=("16x64",),
        notes={
            "eager": "F.cross_entropy(logits.float(), labels, ignore_index=-100), every 16th label -100",
            "liger": "liger_cross_entropy(logits, labels, ignore_index=-100) on the bf16 logits; in fwd+bwd it "
                     "overwrites the logits with their gradient, so impls measured after it on the same inputs "
                     "check against changed logits: time it in a run of its own (--impls liger)",
        },
    ),
    "layer_norm": PatternSpec(
        eager=layer_norm_eager,
        make_inputs=layer_norm_inputs,
        grad_inputs=(0, 1, 2),
        bytes_fwd=layer_norm_bytes_fwd,
        bytes_fwd_bwd=layer_norm_bytes_fwd_bwd,
        liger=layer_norm_liger,
        shapes=("8192x4096", "8192x8192", "2048x1024", "2048x16384"),
        smoke_shapes=("4x40",),
        notes={
            "eager": "F.layer_norm(x, (H,), w, b, 1e-5) (nn.LayerNorm)",
            "liger": "LigerLayerNormFunction.apply(x, w, b, 1e-5)",
        },
    ),
    "rope": PatternSpec(
        eager=rope_hf,
        make_inputs=rope_inputs,
        grad_inputs=(0, 1),
        bytes_fwd=rope_bytes_fwd,
        bytes_fwd_bwd=rope_bytes_fwd_bwd,
        liger=rope_liger,
        shapes=("4x32x4096x128",),
        smoke_shapes=("1x8x4x16",),
        notes={
            "eager": "HF Llama apply_rotary_pos_emb (rotate_half), q [B, H, S, D] and k with 8 heads as strided "
                     "transposes of [B, S, H, D], cos/sin [B, S, D] at random position ids",
            "liger": "liger_rotary_pos_emb(q, k, cos, sin)",
        },
        tune_args=("--pattern", "rope", "--flags", f"kv_heads={ROPE_KV_HEADS}"),
    ),
    "linear_cross_entropy": PatternSpec(
        eager=linear_cross_entropy_hf,
        make_inputs=linear_cross_entropy_inputs,
        grad_inputs=(0, 1),
        bytes_fwd=linear_cross_entropy_bytes_fwd,
        bytes_fwd_bwd=linear_cross_entropy_bytes_fwd_bwd,
        liger=linear_cross_entropy_liger,
        shapes=("8192x4096->128256", "8192x2048->128256", "16384x4096->32000"),
        smoke_shapes=("16x32->64",),
        notes={
            "eager": "F.cross_entropy((h @ W.T).float(), labels), every 16th label -100; case tokens x hidden -> vocab",
            "liger": "LigerFusedLinearCrossEntropyLoss(ignore_index=-100)(W, h, labels)",
            "cce": "cut_cross_entropy.linear_cross_entropy(h, W, labels, ignore_index=-100), impl cce "
                   "(its default filter_eps: small gradient entries skipped)",
            "cce-compile": "the same with impl torch_compile",
        },
        other_peers={"cce": linear_cross_entropy_cce("cce"), "cce-compile": linear_cross_entropy_cce("torch_compile")},
    ),
}


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class Ctx:
    device: torch.device
    smoke: bool
    cache_dir: str | None
    tune: bool
    tune_budget: float | None


def parse_shape(case: str) -> tuple[int, ...]:
    # "8192x4096->128256" (tokens x hidden -> vocab) is one more dim
    return tuple(int(d) for d in case.lower().replace("->", "x").split("x"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], ctx: Ctx) -> float:
    """Median milliseconds of ``fn``: the tuner's (``do_bench``, at least 10 runs however long one is) on CUDA,
    perf_counter medians otherwise."""
    if ctx.device.type == "cuda" and not ctx.smoke:
        from autokernel.playbook.timing import median_ms

        return median_ms(fn, ctx.device)
    for _ in range(2):
        fn()
    sync(ctx.device)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        sync(ctx.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(step: Callable[[], Any], ctx: Ctx) -> float | None:
    """GPU time of one ``step`` (CUDA-graph replay: ``autokernel.playbook.timing.graph_ms``); None on the
    CPU, in smoke runs, or where capture fails."""
    if ctx.smoke:
        return None
    from autokernel.playbook.timing import graph_ms

    ms = graph_ms(step, ctx.device)
    if ms is None and ctx.device.type == "cuda":
        print("[gpu_ms] capture failed (a step that syncs or allocates on the host)", flush=True)
    return ms


def copy_gbps(ctx: Ctx) -> float:
    """Copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = 2**30 if (ctx.device.type == "cuda" and not ctx.smoke) else 2**24
    a = torch.randn(nbytes // 4, device=ctx.device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), ctx)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (inf on NaN or shape mismatch)."""
    if a.shape != b.shape:
        return math.inf
    a32, b32 = a.detach().float(), b.detach().float()
    if not torch.isfinite(a32).all():
        return math.inf
    scale = b32.abs().max().item()
    return (a32 - b32).abs().max().item() / (scale if scale > 0 else 1.0)


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def forget_dynamic_marks(sets: Sequence[Sequence[torch.Tensor]]) -> None:
    """Drop what an earlier impl's compile left on the shared inputs. AOTAutograd stamps
    ``_dynamo_propagated_dynamic_indices`` on the tensors a graph compiled with ``dynamic=True`` saves for its
    backward (Cut Cross-Entropy's functions: h and W), and Dynamo then traces those dims as symbolic in every later
    compile, across ``torch._dynamo.reset()``: the autokernel row after CCE's saw a symbolic vocabulary (H100, session
    20). Each impl starts from inputs as a user would pass them."""
    for inputs in sets:
        for t in inputs:
            if hasattr(t, "_dynamo_propagated_dynamic_indices"):
                del t._dynamo_propagated_dynamic_indices


def import_autokernel() -> Any:
    import autokernel

    return autokernel


def build_impl(impl: str, spec: PatternSpec) -> Callable[..., Any]:
    fn = spec.eager
    if impl == "eager":
        return fn
    if impl == "inductor":
        return torch.compile(fn)
    if impl == "inductor-max-autotune":
        return torch.compile(fn, mode="max-autotune-no-cudagraphs")
    if impl == "liger":
        if spec.liger is None:
            raise NotImplementedError("no liger callable for this pattern")
        return spec.liger()
    if impl in spec.other_peers:
        return spec.other_peers[impl]()
    if impl == "inductor-cudagraphs":
        return torch.compile(fn, mode="reduce-overhead")
    if impl in ("autokernel", "autokernel-cudagraphs"):
        ak = import_autokernel()
        mode = "reduce-overhead" if impl == "autokernel-cudagraphs" else None
        return torch.compile(fn, backend=ak.backend, mode=mode)
    raise ValueError(f"unknown impl {impl}")


def explain_cache(spec: PatternSpec, inputs: Sequence[torch.Tensor]) -> tuple[str, str | None]:
    """("hit", None) when every instance autokernel finds is a hit, else ("miss", reason)."""
    ak = import_autokernel()
    reset_dynamo()
    try:
        report = ak.explain(spec.eager, *inputs)
    finally:
        reset_dynamo()
    instances = list(getattr(report, "instances", []) or [])
    if not instances:
        return "miss", "explain found no instance of the pattern"
    if all(getattr(i, "status", None) == "hit" for i in instances):
        return "hit", None
    reasons = [
        f"{getattr(i, 'pattern', '?')} {getattr(i, 'status', '?')}: {getattr(i, 'reason', '')}"
        for i in instances
        if getattr(i, "status", None) != "hit"
    ]
    return "miss", "; ".join(reasons)[:300]


def run_tune(pattern: str, case: str, dtype: str, ctx: Ctx, forward_only: bool = False) -> dict[str, Any]:
    """``ak-tune`` on one case (``forward_only``: the forward pass alone, when only it is benchmarked)."""
    cmd = [sys.executable, "-m", "autokernel.playbook.cli", *(PATTERNS[pattern].tune_args or ("--pattern", pattern))]
    cmd += ["--shape", "x".join(map(str, parse_shape(case)))]
    cmd += ["--dtype", dtype]
    if forward_only:
        cmd.append("--forward-only")
    if ctx.tune_budget is not None:
        cmd += ["--budget", f"{ctx.tune_budget:g}"]
    env = dict(os.environ)
    if ctx.cache_dir:
        env["AUTOKERNEL_CACHE_DIR"] = ctx.cache_dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"[tune] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    except OSError as e:
        return {"tune_s": round(time.perf_counter() - t0, 2), "tune_error": short_error(e)}
    res: dict[str, Any] = {"tune_s": round(time.perf_counter() - t0, 2)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    print("\n".join(f"[tune]   {line}" for line in tail), flush=True)
    if proc.returncode != 0:
        res["tune_error"] = f"ak-tune exit {proc.returncode}: " + " | ".join(tail)[-300:]
    return res


# ------------------------------------------------------------------------------------------ one row
def make_sets(
    spec: PatternSpec, shape: tuple[int, ...], dtype: torch.dtype, pass_: str, case_bytes: int, ctx: Ctx
) -> tuple[list[list[torch.Tensor]], list[tuple[torch.Tensor, ...]]]:
    """Input sets (and fixed upstream grads for fwd+bwd) to rotate among so L2 holds none of them."""
    # --smoke: 3 sets, to exercise the rotation
    k = 3 if ctx.smoke else max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(case_bytes, 1))))
    gen = torch.Generator().manual_seed(0)
    sets, grads = [], []
    for _ in range(k):
        ins = spec.make_inputs(shape, dtype, ctx.device, gen)
        if pass_ == "fwd+bwd":
            ins = [t.requires_grad_(True) if i in spec.grad_inputs else t for i, t in enumerate(ins)]
            with torch.no_grad():
                outs = as_tuple(spec.eager(*ins))
            g = tuple(
                torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device=ctx.device, dtype=o.dtype)
                for o in outs
            )
            grads.append(g)
        sets.append(ins)
    return sets, grads


def run_once(
    f: Callable[..., Any], ins: list[torch.Tensor], grads: tuple[torch.Tensor, ...] | None, spec: PatternSpec
) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None]]:
    """One step that keeps its results: outputs and (for fwd+bwd) the input grads."""
    if grads is None:
        with torch.no_grad():
            return tuple(o.detach() for o in as_tuple(f(*ins))), []
    outs = as_tuple(f(*ins))
    torch.autograd.backward(outs, grads)
    gs = [ins[i].grad for i in spec.grad_inputs]
    for i in spec.grad_inputs:
        ins[i].grad = None
    return tuple(o.detach() for o in outs), gs


def measure(
    impl: str,
    spec: PatternSpec,
    sets: list[list[torch.Tensor]],
    grads: list[tuple[torch.Tensor, ...]],
    ref: tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None]],
    tol: float,
    ctx: Ctx,
) -> dict[str, Any]:
    """Build ``impl``, check it against eager, then time it; returns the row's measured keys."""
    train = bool(grads)
    if impl != "eager":
        reset_dynamo()
    f = build_impl(impl, spec)
    row: dict[str, Any] = {}

    # first call (compiles), then check against eager on set 0
    t0 = time.perf_counter()
    outs, gs = run_once(f, sets[0], grads[0] if train else None, spec)
    sync(ctx.device)
    row["first_s"] = round(time.perf_counter() - t0, 3)
    ref_outs, ref_gs = ref
    errs = [rel_err(a, b) for a, b in zip(outs, ref_outs, strict=True)]
    errs += [math.inf if a is None or b is None else rel_err(a, b) for a, b in zip(gs, ref_gs, strict=True)]
    worst = max(errs) if errs else 0.0
    row["ok"] = bool(worst <= tol)
    row["max_rel_err"] = worst if math.isfinite(worst) else None
    del outs, gs

    state = {"i": 0}
    leaves = [[s[i] for i in spec.grad_inputs] for s in sets] if train else []

    graphs = impl in CUDAGRAPH_IMPLS

    def step() -> None:
        i = state["i"]
        state["i"] = (i + 1) % len(sets)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = f(*sets[i])
        if train:
            torch.autograd.backward(as_tuple(out), grads[i])
            for t in leaves[i]:
                t.grad = None

    # peak memory above the inputs, measured apart from do_bench (its L2-flush buffer would count)
    peak = None
    with torch.no_grad() if not train else torch.enable_grad():
        if ctx.device.type == "cuda":
            sync(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
            for _ in range(2):
                step()
            sync(ctx.device)
            peak = round((torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20, 1)
        row["ms"] = time_ms(step, ctx)
        if not graphs:
            row["gpu_ms"] = gpu_ms(step, ctx)
    row["peak_mib"] = peak
    return row


# ------------------------------------------------------------------------------------------ driver
def impls_for(spec: PatternSpec, impls: Sequence[str]) -> list[str]:
    """``impls`` less the peers that ``spec`` has none of (Cut Cross-Entropy exists for linear + CE only)."""
    return [i for i in impls if i not in OTHER_PEERS or i in spec.other_peers]


def bench_pattern(
    name: str, spec: PatternSpec, args: argparse.Namespace, ctx: Ctx, gbps: float
) -> list[dict]:
    rows: list[dict[str, Any]] = []
    dtype_name = spec.dtype
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    cases = args.shapes.split(",") if args.shapes else list(spec.smoke_shapes if ctx.smoke else spec.shapes)
    impls = impls_for(spec, args.impl_list)
    # Every case is tuned before any is measured: ak-tune's worker then has the GPU's memory to itself. Tuned
    # between cases, cross-entropy 8192x128256 ran out of memory beside the ~29 GiB this process still held from
    # the smaller cases (H100, session 21), and its row was Inductor's fallback.
    tune_infos: dict[str, dict[str, Any]] = {}
    if ctx.tune and "autokernel" in args.impl_list:
        for case in cases:
            tune_infos[case] = run_tune(name, case, dtype_name, ctx, forward_only=args.pass_list == ["fwd"])
    for case in cases:
        shape = parse_shape(case)
        tune_info = tune_infos.get(case, {})
        for pass_ in args.pass_list:
            nbytes = (spec.bytes_fwd if pass_ == "fwd" else spec.bytes_fwd_bwd)(shape, itemsize)
            floor_ms = nbytes / (gbps * 1e9) * 1e3
            base = {"pattern": name, "case": case, "dtype": dtype_name, "pass": pass_}
            rows.append({**base, "impl": "floor", "ms": floor_ms, "peak_mib": None, "bytes": nbytes})
            try:
                sets, grads = make_sets(spec, shape, dtype, pass_, nbytes, ctx)
                ref = run_once(spec.eager, sets[0], grads[0] if grads else None, spec)
                # Liger's swiglu backward writes the grads into its saved inputs: every impl is checked on
                # these values, restored before each.
                checked = [t.detach().clone() for t in sets[0]]
            except Exception as e:  # report it and go on with the next case
                print(f"[{name} {case} {pass_}] inputs/reference failed: {short_error(e)}", flush=True)
                for impl in impls:
                    rows.append({**base, "impl": impl, "ms": None, "peak_mib": None, "error": short_error(e)})
                continue
            for impl in impls:
                with torch.no_grad():
                    for t, c in zip(sets[0], checked, strict=True):
                        t.copy_(c)
                forget_dynamic_marks(sets)
                row: dict[str, Any] = {**base, "impl": impl}
                if impl in ("autokernel", "autokernel-cudagraphs"):
                    row.update(tune_info)
                    try:
                        row["cache"], reason = explain_cache(spec, sets[0])
                        if reason:
                            row["reason"] = reason
                    except Exception as e:
                        row["cache"], row["reason"] = "miss", f"explain failed: {short_error(e)}"
                try:
                    row.update(measure(impl, spec, sets, grads, ref, CHECK_TOL[dtype_name], ctx))
                    row["floor_pct"] = round(100 * floor_ms / row["ms"], 2) if row["ms"] else None
                except Exception as e:  # a failing peer gets an error row, never a crash
                    row.setdefault("ms", None)
                    row.setdefault("peak_mib", None)
                    row["error"] = short_error(e)
                    if args.verbose:
                        traceback.print_exc()
                finally:
                    if impl != "eager":
                        reset_dynamo()
                rows.append(row)
                print(f"[{name} {case} {pass_}] {impl}: {fmt_cell(row)}", flush=True)
            del sets, grads, ref
            gc.collect()  # compiled graphs and CUDA-graph pools in reference cycles hold their memory until then
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms >= 1 else f"{ms:.4f}" if ms >= 0.01 else f"{ms:.3g}"


def fmt_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row.get("ms") is None:
        return "error"
    s = _fmt_ms(row["ms"])
    if row.get("gpu_ms") is not None and row["impl"] != "floor":
        s += f" [{_fmt_ms(row['gpu_ms'])}]"
    if row.get("peak_mib") is not None and row["impl"] != "floor":
        s += f" / {row['peak_mib']:.0f} MiB"
    if row.get("ok") is False:
        s += " (WRONG)"
    if row["impl"] in ("autokernel", "autokernel-cudagraphs") and row.get("cache") != "hit":
        s += " (miss)"
    return s


def render_md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = [
        ("eager", "eager"),
        ("inductor", "inductor"),
        ("inductor-max-autotune", "inductor MA"),
        ("liger", "liger"),
        ("cce", "cce"),
        ("cce-compile", "cce compile"),
        ("autokernel", "autokernel"),
        ("inductor-cudagraphs", "inductor +graphs"),
        ("autokernel-cudagraphs", "autokernel +graphs"),
        ("floor", "floor"),
    ]
    lines = [
        f"# {rows[0]['pattern'] if rows else ''} benchmark",
        "",
        f"- device: {meta['device']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- copy bandwidth (read+write): {meta['copy_gbps']:.1f} GB/s",
        "",
        "ms (median) [GPU ms: the same step replayed from a CUDA graph, host cost excluded] / peak MiB above"
        " the inputs. `(miss)`: autokernel had no cached kernel, so the time is"
        " Inductor's fallback. `(WRONG)`: output differs from eager. vs best peer: best correct peer's ms /"
        " autokernel's ms (>1 = autokernel faster). `+graphs`: mode=\"reduce-overhead\" (CUDA graph"
        " replay: host-side cost drops out).",
        "",
        "| case | pass | "
        + " | ".join(c[1] for c in cols)
        + " | autokernel % of floor | autokernel vs best peer | same, GPU time |",
        "|---|---|" + "---|" * (len(cols) + 3),
    ]
    keys: list[tuple[str, str]] = []
    for r in rows:
        if (r["case"], r["pass"]) not in keys:
            keys.append((r["case"], r["pass"]))
    notes: list[str] = []
    for case, pass_ in keys:
        by = {r["impl"]: r for r in rows if r["case"] == case and r["pass"] == pass_}
        ak = by.get("autokernel")
        pct = "—"
        vs = {"ms": "—", "gpu_ms": "—"}
        if ak and ak.get("ms"):
            pct = f"{ak['floor_pct']:.0f}%" if ak.get("floor_pct") is not None else "—"
            for key in vs:
                peers = [(by[p][key], p) for p in PEERS if p in by and by[p].get(key) and by[p].get("ok")]
                if peers and ak.get(key):
                    best_ms, best = min(peers)
                    vs[key] = f"{best_ms / ak[key]:.2f}x ({best})"
        cells = [fmt_cell(by.get(c[0])) for c in cols]
        lines.append(f"| {case} | {pass_} | " + " | ".join(cells) + f" | {pct} | {vs['ms']} | {vs['gpu_ms']} |")
        for impl, r in by.items():
            if r.get("error"):
                notes.append(f"- {case} {pass_} {impl}: error: {r['error']}")
            if impl == "autokernel" and r.get("cache") != "hit":
                notes.append(f"- {case} {pass_} autokernel cache miss: {r.get('reason', '')}")
            if r.get("tune_error") and pass_ == keys[0][1]:
                notes.append(f"- {case} ak-tune: {r['tune_error']}")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="rms_norm", help=f"comma list of {sorted(PATTERNS)}")
    p.add_argument("--shapes", default=None, help="comma list like 8192x8192,2048x1024 (default per pattern)")
    p.add_argument("--impls", default=None, help=f"comma list of {ALL_IMPLS} (floor is always added)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    p.add_argument("--tune", action="store_true", help="run ak-tune for each case before timing autokernel")
    p.add_argument("--tune-budget", type=float, default=None, help="minutes passed to ak-tune --budget")
    p.add_argument("--cache-dir", default=None, help="sets AUTOKERNEL_CACHE_DIR (default: the environment's)")
    p.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: tests the plumbing only")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda, or cpu with --smoke)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing impls")
    args = p.parse_args(argv)
    for name in args.patterns.split(","):
        if name not in PATTERNS:
            p.error(f"unknown pattern {name!r}; known: {sorted(PATTERNS)}")
    impls = args.impls.split(",") if args.impls else list(ALL_IMPLS)
    for impl in impls:
        if impl not in ALL_IMPLS:
            p.error(f"unknown impl {impl!r}; known: {ALL_IMPLS}")
    if args.smoke:
        dropped = [i for i in impls if i in SMOKE_SKIP]
        if dropped:
            print(f"--smoke: skipping {dropped}", flush=True)
        impls = [i for i in impls if i not in SMOKE_SKIP]
    args.impl_list = impls
    args.pass_list = args.passes.split(",")
    for ps in args.pass_list:
        if ps not in PASSES:
            p.error(f"unknown pass {ps!r}; known: {PASSES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run on the device machine, or pass --smoke", file=sys.stderr)
        return 2
    if args.smoke and device.type != "cuda":
        # only here: Triton kernels (autokernel's) run in the interpreter on CPU tensors.
        # Set before anything imports triton (torch._dynamo, autokernel).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.cache_dir:
        os.environ["AUTOKERNEL_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ctx = Ctx(
        device=device,
        smoke=args.smoke,
        cache_dir=os.environ.get("AUTOKERNEL_CACHE_DIR"),
        tune=args.tune,
        tune_budget=args.tune_budget,
    )
    out = bench_e2e.results_dir(args.out, args.smoke, "bench_smoke_")
    torch.manual_seed(0)

    gbps = copy_gbps(ctx)
    script = os.path.relpath(Path(__file__).resolve(), REPO)
    meta = {**bench_e2e.run_header(device, ["python", script], argv), "copy_gbps": round(gbps, 1)}
    print(f"# {meta['device']} torch {meta['torch']} triton {meta['triton']} copy {gbps:.1f} GB/s -> {out}",
          flush=True)

    tables = []
    for name in args.patterns.split(","):
        spec = PATTERNS[name]
        rows = bench_pattern(name, spec, args, ctx, gbps)
        result = {**meta, "rows": rows}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        md = render_md(meta, rows)
        (out / f"{name}.md").write_text(md)
        tables.append(md)
        print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}", flush=True)

    print_tables(tables)
    return 0


def print_tables(tables: list[str]) -> None:
    """The tables' rows and notes, last: the device tool shows the tail of a run's output."""
    print()
    for md in tables:
        print("\n".join(line for line in md.splitlines() if line.startswith("|") or line.startswith("- ")))


if __name__ == "__main__":
    sys.exit(main())
