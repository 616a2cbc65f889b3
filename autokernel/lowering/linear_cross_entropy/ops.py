"""Linear + cross-entropy as ``torch.ops.autokernel`` custom ops: forward-only, training, and the backward of
reduction 'none'.

The ops are functional (no input mutation, outputs never alias inputs) and pick their configuration (rows per
chunk, the cross-entropy kernel's launch) at run time from the actual shape, through the in-memory table of
the disk cache. Every op returns the same tuple shape whatever its flags; an output not asked for is an
empty tensor (a custom op cannot return None).

- ``linear_cross_entropy``: ``(loss, logits)``, no gradients.
- ``linear_cross_entropy_train``: ``(loss, logits, dx, dw, db)``. For 'mean'/'sum' the gradients for an
  upstream gradient of 1 are computed in the forward (see ``kernels``); the backward multiplies them by the
  incoming scalar in plain torch ops, which Inductor computes in place in the saved buffers (they are
  donated to the backward graph): no second ``dW``. For 'none' the forward computes the losses only and
  saves its inputs; the backward is ``linear_cross_entropy_backward``, which recomputes each chunk.
- ``logits`` (the ``keep_logits`` flag: the model reads the logits outside the loss, as HF's models return
  them) is written once, in the logits' dtype, and is marked non-differentiable: its gradient would need a
  logits-sized tensor. The backend only keeps it where no graph node reading it needs its gradient; a
  returned ``logits`` therefore has ``requires_grad=False``.

Only the opaque flavour exists (``torch.library.custom_op``), on CUDA too: the op's time is cuBLAS matmuls
launched from Python, a few launches per chunk of ~1000 rows; Inductor tracing it (``triton_op``) would
functionalize the ``out=`` writes into the chunk buffer and could not keep the memory plan.
"""

from __future__ import annotations

import functools

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.cross_entropy.ops import source_kernels
from autokernel.lowering.launch import cached_choice, run_with_fallback
from autokernel.lowering.linear_cross_entropy.kernels import (
    Grads,
    LinearCrossEntropyConfig,
    default_config,
    linear_cross_entropy,
)
from autokernel.lowering.pattern import dtype_name

PATTERN = "linear_cross_entropy"


@functools.cache  # computed on every call of an opaque op; its arguments are few and hashable
def pattern_key(reduction: str, ignore_index: int, label_smoothing: float, x_dtype: torch.dtype,
                out_dtype: torch.dtype, bias: bool, vocab: int, keep_logits: bool) -> str:
    """The variant part of the cache key. The lookup's own size is the hidden size (the width of ``x``); the
    vocabulary, the other width, is part of the variant."""
    upcast = int(out_dtype != x_dtype)
    return (f"{PATTERN}/reduction={reduction},ignore_index={int(ignore_index)},smoothing={float(label_smoothing):g},"
            f"x={dtype_name(x_dtype)},upcast={upcast},bias={int(bias)},vocab={int(vocab)},logits={int(keep_logits)}")


def _memo_key(x, weight, bias, reduction, ignore_index, label_smoothing, out_dtype, keep_logits, cache_dir):
    vocab, hidden = weight.shape
    key = pattern_key(reduction, ignore_index, label_smoothing, x.dtype, out_dtype, bias is not None, vocab,
                      keep_logits)
    return (PATTERN, cache_dir, x.device, key, hidden, row_bucket(x.numel() // max(hidden, 1)))


def _default(x: torch.Tensor, weight: torch.Tensor) -> LinearCrossEntropyConfig:
    vocab, hidden = weight.shape
    return default_config(row_bucket(x.numel() // max(hidden, 1)), hidden, vocab, x.dtype)


def select_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str,
                  ignore_index: int, label_smoothing: float, out_dtype: torch.dtype, keep_logits: bool,
                  cache_dir: str) -> tuple[LinearCrossEntropyConfig, object]:
    """The tuned configuration (and cross-entropy kernels, for a source entry) for this call's shape, else the
    built-in heuristic: one dict read per call after the first per shape bucket."""
    memo_key = _memo_key(x, weight, bias, reduction, ignore_index, label_smoothing, out_dtype, keep_logits,
                         cache_dir)
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        _, _, _, key, hidden, _ = memo_key
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, x.device, key, hidden, x.numel() // max(hidden, 1),
                                                        LinearCrossEntropyConfig, source_kernels, _default(x, weight))
    return chosen


def _run(x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, keep_logits, cache_dir,
         **kwargs):
    """``linear_cross_entropy`` with the cache's choice, falling back to the built-in default (from now on, for
    this shape) if that raises: a source kernel that does not compile on this GPU, say."""
    choice = (bias, reduction, ignore_index, label_smoothing, out_dtype, keep_logits, cache_dir)
    return run_with_fallback(
        select_config(x, weight, *choice),
        lambda config, kernels: linear_cross_entropy(x, weight, bias, labels, ignore_index, label_smoothing, reduction,
                                                     out_dtype, config, keep_logits=keep_logits, kernels=kernels,
                                                     **kwargs),
        PATTERN, x, lambda: (_memo_key(x, weight, *choice), _default(x, weight)))


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _or_empty(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return value if value is not None else _empty(like)


# ---- fakes: the real outputs' shapes, dtypes and (contiguous) strides ---------------------------------------


def _loss_like(x, labels, reduction, out_dtype):
    return x.new_empty((labels.numel(),) if reduction == "none" else (), dtype=out_dtype)


def _logits_like(x, weight, keep_logits):
    return x.new_empty((*x.shape[:-1], weight.shape[0])) if keep_logits else _empty(x)


def _grads_like(x, weight, bias, grad_x, grad_weight, grad_bias):
    return (x.new_empty(x.shape) if grad_x else _empty(x),
            weight.new_empty(weight.shape) if grad_weight else _empty(x),
            bias.new_empty(bias.shape) if grad_bias and bias is not None else _empty(x))


def _define_ops() -> None:
    """Define ``autokernel::linear_cross_entropy``, ``linear_cross_entropy_train`` and ``linear_cross_entropy_backward``
    (see the module docstring), their fakes, and the training op's autograd."""
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                ignore_index: int, label_smoothing: float, reduction: str, out_dtype: torch.dtype, keep_logits: bool,
                cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        r = _run(x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, keep_logits, cache_dir)
        return r.loss, _or_empty(r.logits, x)

    def train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
              ignore_index: int, label_smoothing: float, reduction: str, out_dtype: torch.dtype, keep_logits: bool,
              grad_x: bool, grad_weight: bool, grad_bias: bool,
              cache_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # 'none': the gradients need the upstream one per row first (the backward recomputes them).
        grads = Grads(grad_x, grad_weight, grad_bias and bias is not None) if reduction != "none" else Grads(
            False, False, False)
        r = _run(x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, keep_logits, cache_dir,
                 grads=grads)
        return (r.loss, _or_empty(r.logits, x), _or_empty(r.dx, x), _or_empty(r.dw, x), _or_empty(r.db, x))

    def backward(dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 labels: torch.Tensor, ignore_index: int, label_smoothing: float, out_dtype: torch.dtype,
                 grad_x: bool, grad_weight: bool, grad_bias: bool,
                 cache_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = _run(x, weight, bias, labels, ignore_index, label_smoothing, "none", out_dtype, False, cache_dir,
                 grads=Grads(grad_x, grad_weight, grad_bias and bias is not None), dloss_rows=dloss)
        return _or_empty(r.dx, x), _or_empty(r.dw, x), _or_empty(r.db, x)

    define = torch.library.custom_op
    forward_op = define(f"autokernel::{PATTERN}", forward, mutates_args=())
    train_op = define(f"autokernel::{PATTERN}_train", train, mutates_args=())
    backward_op = define(f"autokernel::{PATTERN}_backward", backward, mutates_args=())

    forward_op.register_fake(lambda x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype,
                             keep_logits, cache_dir: (_loss_like(x, labels, reduction, out_dtype),
                                                      _logits_like(x, weight, keep_logits)))

    def train_fake(x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, keep_logits, grad_x,
                   grad_weight, grad_bias, cache_dir):
        grads = (tuple(_empty(x) for _ in range(3)) if reduction == "none"
                 else _grads_like(x, weight, bias, grad_x, grad_weight, grad_bias))
        return (_loss_like(x, labels, reduction, out_dtype), _logits_like(x, weight, keep_logits), *grads)

    train_op.register_fake(train_fake)
    backward_op.register_fake(lambda dloss, x, weight, bias, labels, ignore_index, label_smoothing, out_dtype, grad_x,
                              grad_weight, grad_bias, cache_dir: _grads_like(x, weight, bias, grad_x, grad_weight,
                                                                              grad_bias))

    def setup_context(ctx, inputs, output):
        (x, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, _keep, grad_x, grad_weight,
         grad_bias, cache_dir) = inputs
        # The logits (and the gradients, which only the backward reads) carry no gradient of their own.
        ctx.mark_non_differentiable(*output[1:])
        ctx.reduction = reduction
        ctx.wants = (grad_x, grad_weight, grad_bias and bias is not None)
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, labels)
            ctx.args = (ignore_index, label_smoothing, out_dtype, *ctx.wants, cache_dir)
        else:
            ctx.save_for_backward(*output[2:])

    def train_backward(ctx, dloss, *_unused):
        if ctx.reduction == "none":
            x, weight, bias, labels = ctx.saved_tensors
            grads = backward_op(dloss, x, weight, bias, labels, *ctx.args)
        else:
            # A scalar loss: the saved gradients are those for dloss = 1. Plain torch ops, so that Inductor
            # writes the product over the (donated) saved buffer instead of allocating a second dW.
            grads = tuple(g * dloss for g in ctx.saved_tensors)
        dx, dw, db = (g if want else None for g, want in zip(grads, ctx.wants, strict=True))
        return dx, dw, db, None, None, None, None, None, None, None, None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)


_define_ops()
