"""Softmax and log-softmax as ``torch.ops.autokernel`` custom ops: the forward-only op, the training op and
its backward.

The ops are functional (no input mutation, outputs never alias inputs) and pick their kernel
configuration at run time from the actual shape, through the in-memory table of the disk cache:
the backend never branches on symbolic sizes, so it adds no guards, and a recompile for a new shape
needs no new decision.

Math (over the last dim, in float32; ``y`` in ``out_dtype``, ``dx`` in x's dtype):

- ``softmax``: ``y = exp(x - max) / sum(exp(x - max))``; backward ``dx = y * (dy - sum(dy * y))``;
- ``log_softmax``: ``y = x - max - log(sum(exp(x - max)))``; backward ``dx = dy - exp(y) * sum(dy)``.

The backward needs ``y`` only, the forward's own output: the training op saves nothing else.
"""

from __future__ import annotations

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.launch import cached_choice, define_plain_op, load_source_kernels, run_with_fallback
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.softmax.kernels import (
    SoftmaxConfig,
    SourceKernels,
    default_config,
    softmax_bwd,
    softmax_fwd,
)

PATTERN = "softmax"
OPS = ("softmax", "log_softmax")  # the values of the variant flag ``op``


def pattern_key(log: bool, x_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel."""
    return f"{PATTERN}/op={OPS[bool(log)]},x={dtype_name(x_dtype)},out={dtype_name(out_dtype)}"


FWD_KERNEL, BWD_KERNEL = "softmax_fwd_kernel", "softmax_bwd_kernel"  # names a source entry defines


def source_kernels(root: str, source: str) -> SourceKernels:
    """The kernel pair a source text defines (loaded under ``root``); ValueError when it lacks one."""
    return SourceKernels(*load_source_kernels(root, source, (FWD_KERNEL, BWD_KERNEL)))


def _shape(t: torch.Tensor) -> tuple[int, int]:
    hidden = t.shape[-1] if t.dim() else 1
    return hidden, t.numel() // max(hidden, 1)


def select_config(t: torch.Tensor, log: bool, x_dtype: torch.dtype, out_dtype: torch.dtype,
                  cache_dir: str) -> tuple[SoftmaxConfig, SourceKernels | None]:
    """The tuned configuration (and kernels, for a source entry) for this call's shape (``t`` is ``x`` in the
    forward, ``y`` in the backward: same shape), else the built-in heuristic. Runs on every call: after the
    first call per shape bucket it is one dict read."""
    memo_key = _memo_key(t, log, x_dtype, out_dtype, cache_dir)
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        hidden, rows = _shape(t)
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, t.device, pattern_key(log, x_dtype, out_dtype),
                                                        hidden, rows, SoftmaxConfig, source_kernels,
                                                        _default(t, x_dtype))
    return chosen


def _memo_key(t: torch.Tensor, log: bool, x_dtype: torch.dtype, out_dtype: torch.dtype, cache_dir: str) -> tuple:
    hidden, rows = _shape(t)
    return (PATTERN, cache_dir, t.device, bool(log), x_dtype, out_dtype, hidden, row_bucket(rows))


def _default(t: torch.Tensor, x_dtype: torch.dtype) -> SoftmaxConfig:
    hidden, rows = _shape(t)
    return default_config(hidden, row_bucket(rows), x_dtype)


def _launch(t: torch.Tensor, log: bool, x_dtype: torch.dtype, out_dtype: torch.dtype, cache_dir: str, run):
    return run_with_fallback(select_config(t, log, x_dtype, out_dtype, cache_dir), run, PATTERN, t,
                             lambda: (_memo_key(t, log, x_dtype, out_dtype, cache_dir), _default(t, x_dtype)))


def _define_ops(suffix: str, inline: bool) -> None:
    """Define ``autokernel::softmax{suffix}``, ``softmax_train{suffix}`` and ``softmax_backward{suffix}``.

    Two flavours of the same three ops, as for RMSNorm (``autokernel/lowering/rms_norm/ops.py``). Opaque
    (``torch.library.custom_op``, or a plain ``Library`` op where no autograd formula runs): Inductor calls the op,
    and the op picks its configuration on every call from the actual shape; it serves symbolic shapes and the Triton
    interpreter. Inline (``torch.library.triton_op``): AOTAutograd traces through the op, so Inductor launches our
    kernels from its own generated code; the configuration is picked once, at trace time, which is only right for
    static shapes. The forward-only and training ops compute the same thing; only the training op has an autograd
    formula (which saves ``y``).
    """
    define = torch.library.triton_op if inline else torch.library.custom_op

    def forward(x: torch.Tensor, log: bool, out_dtype: torch.dtype, cache_dir: str) -> torch.Tensor:
        return _launch(x, log, x.dtype, out_dtype, cache_dir, lambda config, kernels: softmax_fwd(
            x, log, out_dtype, config, kernels=kernels, traceable=inline))

    def backward(dy: torch.Tensor, y: torch.Tensor, log: bool, x_dtype: torch.dtype,
                 cache_dir: str) -> torch.Tensor:
        return _launch(y, log, x_dtype, y.dtype, cache_dir, lambda config, kernels: softmax_bwd(
            dy, y, log, x_dtype, config, kernels=kernels, traceable=inline))

    def fake_forward(x, log, out_dtype, cache_dir):
        return x.new_empty(x.shape, dtype=out_dtype)

    define_plain_op(f"autokernel::softmax{suffix}", forward, inline=inline, fake=fake_forward)
    backward_op = define_plain_op(f"autokernel::softmax_backward{suffix}", backward, inline=inline,
                                  fake=lambda dy, y, log, x_dtype, cache_dir: y.new_empty(y.shape, dtype=x_dtype))
    train_op = define(f"autokernel::softmax_train{suffix}", forward, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body
        train_op.register_fake(fake_forward)

    def setup_context(ctx, inputs, output):
        x, log, _out_dtype, cache_dir = inputs
        ctx.save_for_backward(output)
        ctx.log, ctx.x_dtype, ctx.cache_dir = log, x.dtype, cache_dir

    def train_backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return backward_op(dy, y, ctx.log, ctx.x_dtype, ctx.cache_dir), None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
