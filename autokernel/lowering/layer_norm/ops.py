"""LayerNorm as ``torch.ops.autokernel`` custom ops: the forward-only op, the training op and its backward.

The ops are functional (no input mutation, outputs never alias inputs) and pick their kernel
configuration at run time from the actual shape, through the in-memory table of the disk cache, so the
backend never branches on symbolic sizes. Math (in float32, over the trailing ``norm_ndim`` dims):
``xhat = (x - mean) * rsqrt(var + eps)``, mode ``fp32``: ``y = (xhat * w + b).to(out_dtype)``; mode
``rounded``: ``y = (xhat.to(x.dtype) * w + b).to(out_dtype)``; backward: ``g = dy * w``,
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``dw = sum_rows(dy * xhat)``, ``db = sum_rows(dy)``.
"""

from __future__ import annotations

import math

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.launch import cached_choice, define_plain_op
from autokernel.lowering.layer_norm.kernels import (
    LayerNormConfig,
    default_config,
    layer_norm_bwd,
    layer_norm_fwd,
)
from autokernel.lowering.pattern import dtype_name

PATTERN = "layer_norm"


def pattern_key(mode: str, x_dtype: torch.dtype, w_dtype: torch.dtype | None, b_dtype: torch.dtype | None,
                out_dtype: torch.dtype) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel."""
    w = dtype_name(w_dtype) if w_dtype is not None else "none"
    b = dtype_name(b_dtype) if b_dtype is not None else "none"
    return f"{PATTERN}/mode={mode},x={dtype_name(x_dtype)},w={w},b={b},out={dtype_name(out_dtype)}"


def _rows_hidden(x: torch.Tensor, norm_ndim: int) -> tuple[int, int]:
    hidden = math.prod(x.shape[x.dim() - norm_ndim:]) if x.dim() >= norm_ndim else 1
    return x.numel() // max(hidden, 1), hidden


def _memo_key(x, weight, bias, norm_ndim, mode, out_dtype, cache_dir) -> tuple:
    rows, hidden = _rows_hidden(x, norm_ndim)
    return (PATTERN, cache_dir, x.device, mode, x.dtype, weight.dtype if weight is not None else None,
            bias.dtype if bias is not None else None, out_dtype, hidden, row_bucket(rows))


def select_config(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm_ndim: int,
                  mode: str, out_dtype: torch.dtype, cache_dir: str) -> LayerNormConfig:
    """The tuned configuration for this call's shape, else the built-in heuristic. Runs on every call:
    after the first call per shape bucket it is one dict read."""
    memo_key = _memo_key(x, weight, bias, norm_ndim, mode, out_dtype, cache_dir)
    config = runtime.memo.get(memo_key)
    if config is None:
        rows, hidden = _rows_hidden(x, norm_ndim)
        key = pattern_key(mode, x.dtype, weight.dtype if weight is not None else None,
                          bias.dtype if bias is not None else None, out_dtype)
        default = default_config(hidden, row_bucket(rows), x.dtype)
        config = runtime.memo[memo_key] = cached_choice(cache_dir, x.device, key, hidden, rows, LayerNormConfig,
                                                        _no_source_kernels, default)[0]
    return config


def _no_source_kernels(_root: str, _source: str) -> None:
    """``cached_choice``'s loader for a source entry: LayerNorm's ops launch only the built-in kernels, so such an
    entry is unusable (logged; the default configuration runs)."""
    raise ValueError("a source entry: layer_norm serves family configs only")


def _define_ops(suffix: str, inline: bool) -> None:
    """Define ``autokernel::layer_norm{suffix}``, ``layer_norm_train{suffix}`` and ``layer_norm_backward{suffix}``,
    in the two flavours of ``autokernel.lowering.rms_norm.ops``: opaque (``custom_op`` or a plain ``Library`` op:
    picks its configuration on every call; symbolic shapes, the Triton interpreter) and inline (``triton_op``:
    Inductor launches the kernels from its own code; configuration picked at trace time, right for static shapes
    only)."""
    define = torch.library.triton_op if inline else torch.library.custom_op

    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                norm_ndim: int, mode: str, out_dtype: torch.dtype, cache_dir: str) -> torch.Tensor:
        config = select_config(x, weight, bias, norm_ndim, mode, out_dtype, cache_dir)
        return layer_norm_fwd(x, weight, bias, eps, norm_ndim, mode, out_dtype, config, False, inline)[0]

    def train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
              norm_ndim: int, mode: str, out_dtype: torch.dtype,
              cache_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = select_config(x, weight, bias, norm_ndim, mode, out_dtype, cache_dir)
        return layer_norm_fwd(x, weight, bias, eps, norm_ndim, mode, out_dtype, config, True, inline)

    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 mean: torch.Tensor, rstd: torch.Tensor, norm_ndim: int, mode: str, out_dtype: torch.dtype,
                 cache_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = select_config(x, weight, bias, norm_ndim, mode, out_dtype, cache_dir)
        dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, norm_ndim, mode, config, inline)
        # A custom op returns tensors, never None: an absent weight or bias gets an empty gradient.
        return dx, dw if dw is not None else x.new_empty((0,)), db if db is not None else x.new_empty((0,))

    define_plain_op(f"autokernel::layer_norm{suffix}", forward, inline=inline,
                    fake=lambda x, weight, bias, eps, norm_ndim, mode, out_dtype, cache_dir:
                    x.new_empty(x.shape, dtype=out_dtype))
    backward_op = define_plain_op(
        f"autokernel::layer_norm_backward{suffix}", backward, inline=inline,
        fake=lambda dy, x, weight, bias, mean, rstd, norm_ndim, mode, out_dtype, cache_dir: (
            x.new_empty(x.shape),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,)),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))))
    train_op = define(f"autokernel::layer_norm_train{suffix}", train, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body

        def stats_shape(x, norm_ndim):
            return x.shape[: x.dim() - norm_ndim]

        train_op.register_fake(lambda x, weight, bias, eps, norm_ndim, mode, out_dtype, cache_dir: (
            x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(stats_shape(x, norm_ndim), dtype=torch.float32),
            x.new_empty(stats_shape(x, norm_ndim), dtype=torch.float32)))

    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps, norm_ndim, mode, out_dtype, cache_dir = inputs
        ctx.save_for_backward(x, weight, bias, output[1], output[2])
        ctx.norm_ndim, ctx.mode, ctx.out_dtype, ctx.cache_dir = norm_ndim, mode, out_dtype, cache_dir

    def train_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = backward_op(dy, x, weight, bias, mean, rstd, ctx.norm_ndim, ctx.mode, ctx.out_dtype,
                                 ctx.cache_dir)
        return (dx, dw if weight is not None else None, db if bias is not None else None,
                None, None, None, None, None)

    train_op.register_autograd(train_backward, setup_context=setup_context)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
