"""The gated MLP activation as ``torch.ops.autokernel`` custom ops: forward-only op, training op, backward.

``y = act(gate) * up`` with ``act`` silu (SwiGLU), gelu or gelu tanh (GeGLU). The ops take ``x`` and
``up``: with layout "separate" ``x`` is gate; with "gate_up" / "up_gate" ``x`` holds gate and up as the
halves of its last dim (``up`` is None) and the backward returns the one gradient of ``x``.

The ops are functional (no input mutation, outputs never alias inputs) and pick their kernel
configuration at run time from the actual shape, through the in-memory table of the disk cache. The
training op saves only its inputs: the backward recomputes the activation.
"""

from __future__ import annotations

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.launch import cached_choice, define_plain_op, load_source_kernels, run_with_fallback
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.swiglu.kernels import (
    SourceKernels,
    SwigluConfig,
    default_config,
    swiglu_bwd,
    swiglu_fwd,
)

PATTERN = "swiglu"
FWD_KERNEL, BWD_KERNEL = "swiglu_fwd_kernel", "swiglu_bwd_kernel"  # names a source entry defines


def pattern_key(act: str, layout: str, dtype: torch.dtype) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel."""
    return f"{PATTERN}/act={act},layout={layout},dtype={dtype_name(dtype)}"


def gate_width(x: torch.Tensor, layout: str) -> int:
    """The width of gate's rows (the cache's hidden size): x's last dim, or half of it for one tensor."""
    return x.shape[-1] if layout == "separate" else x.shape[-1] // 2


def source_kernels(root: str, source: str) -> SourceKernels:
    """The kernel pair a source text defines (loaded under ``root``); ValueError when it lacks one."""
    return SourceKernels(*load_source_kernels(root, source, (FWD_KERNEL, BWD_KERNEL)))


def _shape_of(x: torch.Tensor, layout: str) -> tuple[int, int]:
    hidden = gate_width(x, layout) if x.dim() else 1
    return hidden, (x.numel() // max(x.shape[-1], 1) if x.dim() else 1)


def _memo_key(x: torch.Tensor, act: str, layout: str, cache_dir: str) -> tuple:
    hidden, rows = _shape_of(x, layout)
    return (PATTERN, cache_dir, x.device, act, layout, x.dtype, hidden, row_bucket(rows))


def select_config(x: torch.Tensor, act: str, layout: str,
                  cache_dir: str) -> tuple[SwigluConfig, SourceKernels | None]:
    """The tuned configuration (and kernels, for a source entry) for this call's shape, else the built-in
    heuristic. Runs on every call: after the first call per shape bucket it is one dict read."""
    memo_key = _memo_key(x, act, layout, cache_dir)
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        hidden, rows = _shape_of(x, layout)
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, x.device, pattern_key(act, layout, x.dtype),
                                                        hidden, rows, SwigluConfig, source_kernels,
                                                        _default(x, layout))
    return chosen


def _default(x: torch.Tensor, layout: str) -> SwigluConfig:
    hidden, rows = _shape_of(x, layout)
    return default_config(hidden, row_bucket(rows), x.dtype)


def _launch(x: torch.Tensor, act: str, layout: str, cache_dir: str, run):
    return run_with_fallback(select_config(x, act, layout, cache_dir), run, PATTERN, x,
                             lambda: (_memo_key(x, act, layout, cache_dir), _default(x, layout)))


def _forward(x, up, act, layout, cache_dir, traceable: bool) -> torch.Tensor:
    return _launch(x, act, layout, cache_dir, lambda config, kernels: swiglu_fwd(
        x, up, act, layout, config, kernels=kernels, traceable=traceable))


def _backward(dy, x, up, act, layout, cache_dir, traceable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dup = _launch(x, act, layout, cache_dir, lambda config, kernels: swiglu_bwd(
        dy, x, up, act, layout, config, kernels=kernels, traceable=traceable))
    return dx, dup if dup is not None else x.new_empty((0,))


def _out_shape(x: torch.Tensor, layout: str) -> tuple:
    return tuple(x.shape) if layout == "separate" else (*x.shape[:-1], x.shape[-1] // 2)


def _define_ops(suffix: str, inline: bool) -> None:
    """Define ``autokernel::swiglu{suffix}``, ``swiglu_train{suffix}`` and ``swiglu_backward{suffix}``.

    Two flavours of the same three ops, as for RMSNorm (see ``autokernel.lowering.rms_norm.ops``): opaque
    (``custom_op`` or a plain ``Library`` op, configuration picked on every call; symbolic shapes, the interpreter)
    and inline (``triton_op``, traced through, so Inductor launches our kernels from its own code; static shapes)."""
    define = torch.library.triton_op if inline else torch.library.custom_op

    def forward(x: torch.Tensor, up: torch.Tensor | None, act: str, layout: str, cache_dir: str) -> torch.Tensor:
        return _forward(x, up, act, layout, cache_dir, inline)

    def train(x: torch.Tensor, up: torch.Tensor | None, act: str, layout: str, cache_dir: str) -> torch.Tensor:
        return _forward(x, up, act, layout, cache_dir, inline)

    def backward(dy: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, act: str, layout: str,
                 cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(dy, x, up, act, layout, cache_dir, inline)

    def fake_forward(x, up, act, layout, cache_dir):
        return x.new_empty(_out_shape(x, layout))

    define_plain_op(f"autokernel::swiglu{suffix}", forward, inline=inline, fake=fake_forward)
    backward_op = define_plain_op(
        f"autokernel::swiglu_backward{suffix}", backward, inline=inline,
        fake=lambda dy, x, up, act, layout, cache_dir: (
            x.new_empty(x.shape), up.new_empty(up.shape) if up is not None else x.new_empty((0,))))
    train_op = define(f"autokernel::swiglu_train{suffix}", train, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body
        train_op.register_fake(fake_forward)

    def setup_context(ctx, inputs, output):
        x, up, act, layout, cache_dir = inputs
        ctx.save_for_backward(x, up)
        ctx.act, ctx.layout, ctx.cache_dir = act, layout, cache_dir

    def train_backward(ctx, dy):
        x, up = ctx.saved_tensors
        dx, dup = backward_op(dy, x, up, ctx.act, ctx.layout, ctx.cache_dir)
        return dx, (dup if up is not None else None), None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
