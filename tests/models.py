"""Modules and helpers more than one test file uses."""

import time

import torch
from torch import nn

from autokernel.cache import KernelCache, row_bucket
from autokernel.playbook.tolerances import assert_close


def rand_weight(h: int, seed: int = 1234) -> nn.Parameter:
    return nn.Parameter(torch.randn(h, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0)


def check_hf_llama(compiled, model: nn.Module, x: torch.Tensor) -> None:
    """Run ``compiled`` (an ``HFLlama`` ``model``, compiled) on ``x`` with a random upstream gradient and
    compare y, dx and dw with float64, rounding the normalized value to x's dtype where the model does."""
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = model.weight.detach().double().requires_grad_(True)
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + model.variance_epsilon)).to(x.dtype).double()
    y64.backward(dy.double())
    assert_close(y, y64, x.dtype, "y")
    assert_close(xr.grad, x64.grad, x.dtype, "dx")
    assert_close(model.weight.grad, w64.grad, x.dtype, "dw")
    model.weight.grad = None


class HFLlama(nn.Module):
    """transformers' LlamaRMSNorm (also Mistral, Qwen2)."""

    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.variance_epsilon = eps

    def forward(self, x):
        input_dtype = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(v + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


# An independent implementation of the kernel contract (autokernel.lowering.rms_norm.kernels.SourceKernels).
AGENT_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset,
                        HAS_WEIGHT: tl.constexpr, LLAMA: tl.constexpr, SAVE_RSTD: tl.constexpr,
                        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    for i in range(ROWS_PER_PROGRAM):
        row = tl.cast(tl.minimum(tl.program_id(0) * ROWS_PER_PROGRAM + i, n_rows - 1), tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + tl.cast(eps, tl.float32))
        n = x * r
        if LLAMA:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            n = n * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32))
        tl.store(Y + row * stride_y + cols, n.to(Y.dtype.element_ty), mask=mask)
        if SAVE_RSTD:
            tl.store(RSTD + row, r)


@triton.jit
def rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                        HAS_WEIGHT: tl.constexpr, LLAMA: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row)
        n = x * r
        g = dy * w
        dx = r * (g - n * (tl.sum(g * n, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if LLAMA:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        dw += dy * n
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols, dw, mask=mask)
'''


def serve_every_miss(cache_dir, device) -> int:
    """Give each recorded miss an entry with its family's default kernel configuration: what ``ak-tune``
    writes under the interpreter, without the search (fast enough for a test)."""
    cache = KernelCache(cache_dir, device=device)
    wanted = cache.wanted()
    for key, w in wanted:
        cache.put_entry({
            "version": 1, "pattern": w["pattern"], "pattern_key": w["pattern_key"], "hidden": w["hidden"],
            "row_bucket": row_bucket(w["rows"]), "shape": w["shape"], "flags": w["flags"], "dtype": w["dtype"],
            "kernel": {"kind": "family", "config": {}}, "winner": {"fwd": "autokernel", "train": "autokernel"},
            "times": {}, "raced": False, "producer": {"strategy": "test"}, "checks": [], "created": time.time(),
        })
        cache.remove_wanted(key)
    return len(wanted)


def lm_step(fn, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of the causal LM ``model`` through ``fn`` (the model, or its compile): the loss and every
    parameter's gradient."""
    model.zero_grad()
    loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_causal_lm_step(model: nn.Module, ids: torch.Tensor, options: dict, grads: bool = True) -> None:
    """A transformers causal LM's training step (``labels=ids``, loss, backward) compiled with the autokernel
    backend against eager's: the loss and, with ``grads``, every parameter's gradient. Against eager in the
    model's dtype: in bf16 eager is itself ~1 unit off the exact value, so the bf16 row is applied to eager's own
    result (it allows two units)."""
    dtype = next(model.parameters()).dtype
    torch._dynamo.reset()
    loss_c, grads_c = lm_step(torch.compile(model, backend="autokernel", options=options), model, ids)
    loss_e, grads_e = lm_step(model, model, ids)
    assert_close(loss_c, loss_e.double(), dtype, "loss")
    if grads:
        assert grads_c.keys() == grads_e.keys()
        for name, g in grads_c.items():
            assert_close(g, grads_e[name].double(), dtype, f"grad {name}")


def mask_rewrite_step(model: nn.Module, ids: torch.Tensor, options: dict) -> tuple[list, tuple, tuple]:
    """The attention-mask instances ``autokernel.explain`` finds in a training step of the causal LM ``model``
    (``labels=ids``), then that step compiled with the autokernel backend and in eager: ``(instances, (loss,
    grads) compiled, (loss, grads) eager)``; each test holds them to its own bounds."""
    import autokernel

    torch._dynamo.reset()
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    masks = [i for i in report.instances if i.pattern == "attention_mask"]
    eager = lm_step(model, model, ids)
    torch._dynamo.reset()
    return masks, lm_step(torch.compile(model, backend="autokernel", options=options), model, ids), eager


def force_sdpa_causal_mask(monkeypatch) -> None:
    """transformers as it runs under torch.compile before torch 2.14, whatever the installed torch: its causal mask
    is never skipped while Dynamo traces (``_ignore_causal_mask_sdpa`` is False), so each SDPA call gets the mask
    (and, with GQA, repeated key/value heads)."""
    import transformers.masking_utils as masking_utils

    real = masking_utils._ignore_causal_mask_sdpa
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa",
                        lambda *a, **k: False if torch.compiler.is_compiling() else real(*a, **k))


def sdpa_llama(hidden: int, vocab: int, max_positions: int) -> nn.Module:
    """A 2-layer transformers Llama with SDPA attention (4 heads, 2 key/value heads), seeded weights."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=max_positions)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def compile_log_statuses(caplog) -> list[str]:
    """(pattern, status) of every instance the backend planned, from its compile-time log."""
    out = []
    for r in caplog.records:
        parts = r.getMessage().split()
        if r.name == "autokernel" and len(parts) > 2 and parts[0] == "autokernel:":
            out.append(f"{parts[1]} {parts[2]}")
    return out


def rope_entry(inst, config: dict) -> dict:
    """A cache entry serving the RoPE instance ``inst`` (an ``autokernel.InstanceReport``) with ``config``."""
    import math

    from autokernel.lowering.rope.ops import pattern_key

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "complex64": torch.complex64}
    f = inst.flags
    key = pattern_key(f["layout"], f["rotary_dim"], inst.shape[-1], f["heads"], f["kv_heads"], dtypes[inst.dtype],
                      dtypes[f["cs"]], dtypes[f["out"]])
    return {"version": 1, "pattern": "rope", "pattern_key": key, "hidden": inst.shape[-1],
            "row_bucket": row_bucket(math.prod(inst.shape[:-1])), "kernel": {"kind": "family", "config": config},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()}
