"""RMSNorm as ``torch.ops.autokernel`` custom ops: the forward-only op, the training op and its backward.

The ops are functional (no input mutation, outputs never alias inputs) and pick their kernel
configuration at run time from the actual shape, through the in-memory table of the disk cache:
the backend never branches on symbolic sizes, so it adds no guards, and a recompile for a new shape
needs no new decision.

Math (``n = x * rsqrt(mean(x^2) + eps)`` in float32, ``w_eff = w + offset``):

- mode ``llama``: ``y = w_eff * n.to(x.dtype)``; mode ``gemma``: ``y = (n * w_eff).to(out_dtype)``;
- backward: ``g = dy * w_eff``, ``dx = rstd * (g - n * mean(g * n))``, ``dw = sum_rows(dy * n)``.
"""

from __future__ import annotations

import functools

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.launch import cached_choice, define_plain_op, load_source_kernels, run_with_fallback
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.rms_norm.kernels import (
    RmsNormConfig,
    SourceKernels,
    add_rms_norm_fwd,
    default_config,
    rms_norm_bwd,
    rms_norm_fwd,
)

PATTERN = "rms_norm"
MODES = ("llama", "gemma")


@functools.cache  # computed on every call of an opaque op; its arguments are few and hashable
def pattern_key(mode: str, offset: float, x_dtype: torch.dtype, w_dtype: torch.dtype | None,
                out_dtype: torch.dtype, residual: bool = False) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel.
    ``residual``: add + RMSNorm (the norm of ``x + residual``, whose sum is an output too)."""
    w = dtype_name(w_dtype) if w_dtype is not None else "none"
    key = f"{PATTERN}/mode={mode},offset={float(offset):g},x={dtype_name(x_dtype)},w={w},out={dtype_name(out_dtype)}"
    return key + ",residual=1" if residual else key


FWD_KERNEL, BWD_KERNEL = "rms_norm_fwd_kernel", "rms_norm_bwd_kernel"  # names a source entry defines


def source_kernels(root: str, source: str) -> SourceKernels:
    """The kernel pair a source text defines (loaded under ``root``); ValueError when it lacks one."""
    return SourceKernels(*load_source_kernels(root, source, (FWD_KERNEL, BWD_KERNEL)))


def select_config(x: torch.Tensor, key: str, cache_dir: str) -> tuple[RmsNormConfig, SourceKernels | None]:
    """The tuned configuration (and kernels, for a source entry) for variant ``key`` (:func:`pattern_key`)
    at this call's shape, else the built-in heuristic. Runs on every call of an opaque op: after the
    first call per shape bucket it is one dict read."""
    memo_key = _memo_key(x, key, cache_dir)
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        hidden, rows = _shape(x)
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, x.device, key, hidden, rows, RmsNormConfig,
                                                        source_kernels, _default(x))
    return chosen


def _shape(x: torch.Tensor) -> tuple[int, int]:
    hidden = x.shape[-1] if x.dim() else 1
    return hidden, x.numel() // max(hidden, 1)


def _memo_key(x: torch.Tensor, key: str, cache_dir: str) -> tuple:
    hidden, rows = _shape(x)
    return (key, cache_dir, x.device, hidden, row_bucket(rows))


def _default(x: torch.Tensor) -> RmsNormConfig:
    hidden, rows = _shape(x)
    return default_config(hidden, row_bucket(rows), x.dtype)


def _launch(x, key, cache_dir, run):
    return run_with_fallback(select_config(x, key, cache_dir), run, PATTERN, x,
                             lambda: (_memo_key(x, key, cache_dir), _default(x)))


def _key(x, weight, offset, mode, out_dtype, residual) -> str:
    return pattern_key(mode, offset, x.dtype, weight.dtype if weight is not None else None, out_dtype,
                       residual is not None)


def _forward(x, residual, weight, eps, offset, mode, out_dtype, cache_dir, save_rstd: bool, traceable: bool):
    """(y, rstd) for RMSNorm; (y, h, rstd) for add + RMSNorm (``residual`` given)."""
    key = _key(x, weight, offset, mode, out_dtype, residual)
    if residual is None:
        return _launch(x, key, cache_dir, lambda config, kernels: rms_norm_fwd(
            x, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable))
    return _launch(x, key, cache_dir, lambda config, kernels: add_rms_norm_fwd(
        x, residual, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable))


def _backward(dy, x, weight, rstd, offset, mode, out_dtype, cache_dir, dh, residual: bool, traceable: bool):
    key = pattern_key(mode, offset, x.dtype, weight.dtype if weight is not None else None, out_dtype, residual)
    dx, dw = _launch(x, key, cache_dir, lambda config, kernels: rms_norm_bwd(
        dy, x, weight, rstd, offset, mode, config, kernels=kernels, traceable=traceable, dh=dh))
    return dx, dw if dw is not None else x.new_empty((0,))


def _define_ops(suffix: str, inline: bool) -> None:
    """Define, under ``autokernel::``, ``rms_norm{suffix}`` (forward only), ``rms_norm_train{suffix}`` (also returns
    rstd; differentiable) and ``rms_norm_backward{suffix}``, and the add + RMSNorm pair ``add_rms_norm{suffix}`` /
    ``add_rms_norm_train{suffix}`` (also return ``h = x + residual``), whose backward is
    ``rms_norm_backward{suffix}`` with ``dh`` and ``residual=True``.

    Two flavours of the same ops. Opaque (``torch.library.custom_op`` for the differentiable train ops, a plain
    ``Library`` op for the others, about half the host cost a call: ``define_plain_op``): Inductor calls the op, and
    the op picks its configuration on every call from the actual shape; it serves symbolic shapes and the Triton
    interpreter. Inline (``torch.library.triton_op``): AOTAutograd traces through the op, so Inductor launches our
    kernels from its own generated code (a fraction of the opaque op's host cost, measured in benchmarks/NOTES.md);
    the configuration is picked once, at trace time, which is only right for static shapes.
    """
    define = torch.library.triton_op if inline else torch.library.custom_op

    def forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, mode: str,
                out_dtype: torch.dtype, cache_dir: str) -> torch.Tensor:
        return _forward(x, None, weight, eps, offset, mode, out_dtype, cache_dir, False, inline)[0]

    def train(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, mode: str,
              out_dtype: torch.dtype, cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(x, None, weight, eps, offset, mode, out_dtype, cache_dir, True, inline)

    def add_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                    mode: str, out_dtype: torch.dtype, cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(x, residual, weight, eps, offset, mode, out_dtype, cache_dir, False, inline)[:2]

    def add_train(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                  mode: str, out_dtype: torch.dtype,
                  cache_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, residual, weight, eps, offset, mode, out_dtype, cache_dir, True, inline)

    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 offset: float, mode: str, out_dtype: torch.dtype, cache_dir: str, dh: torch.Tensor | None = None,
                 residual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(dy, x, weight, rstd, offset, mode, out_dtype, cache_dir, dh, residual, inline)

    define_plain_op(f"autokernel::rms_norm{suffix}", forward, inline=inline,
                    fake=lambda x, weight, eps, offset, mode, out_dtype, cache_dir:
                    x.new_empty(x.shape, dtype=out_dtype))
    define_plain_op(f"autokernel::add_rms_norm{suffix}", add_forward, inline=inline,
                    fake=lambda x, residual, weight, eps, offset, mode, out_dtype, cache_dir: (
                        x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape)))
    backward_op = define_plain_op(
        f"autokernel::rms_norm_backward{suffix}", backward, inline=inline,
        fake=lambda dy, x, weight, rstd, offset, mode, out_dtype, cache_dir, dh=None, residual=False: (
            x.new_empty(x.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))))
    train_op = define(f"autokernel::rms_norm_train{suffix}", train, mutates_args=())
    add_train_op = define(f"autokernel::add_rms_norm_train{suffix}", add_train, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body
        def rstd_like(x):
            return x.new_empty(x.shape[:-1], dtype=torch.float32)

        train_op.register_fake(lambda x, weight, eps, offset, mode, out_dtype, cache_dir: (
            x.new_empty(x.shape, dtype=out_dtype), rstd_like(x)))
        add_train_op.register_fake(lambda x, residual, weight, eps, offset, mode, out_dtype, cache_dir: (
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape), rstd_like(x)))

    def setup_context(ctx, inputs, output):
        x, weight, _eps, offset, mode, out_dtype, cache_dir = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.offset, ctx.mode, ctx.out_dtype, ctx.cache_dir = offset, mode, out_dtype, cache_dir

    def train_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = backward_op(dy, x, weight, rstd, ctx.offset, ctx.mode, ctx.out_dtype, ctx.cache_dir)
        return dx, (dw if weight is not None else None), None, None, None, None, None

    def add_setup_context(ctx, inputs, output):
        _x, _residual, weight, _eps, offset, mode, out_dtype, cache_dir = inputs
        ctx.save_for_backward(output[1], weight, output[2])  # the norm's input is h
        ctx.offset, ctx.mode, ctx.out_dtype, ctx.cache_dir = offset, mode, out_dtype, cache_dir

    def add_train_backward(ctx, dy, dh, _drstd):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = backward_op(dy, h, weight, rstd, ctx.offset, ctx.mode, ctx.out_dtype, ctx.cache_dir, dh, True)
        # h = x + residual: both addends get h's whole gradient.
        return dx, dx, (dw if weight is not None else None), None, None, None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)
    add_train_op.register_autograd(add_train_backward, setup_context=add_setup_context)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
