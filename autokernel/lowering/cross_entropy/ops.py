"""Cross-entropy as ``torch.ops.autokernel`` custom ops: the forward-only op, the training op and its backward.

The ops are functional (no input mutation, outputs never alias inputs) and pick their kernel
configuration at run time from the actual shape, through the in-memory table of the disk cache.

The training op returns ``(loss, stats)``: each row's ``(max, log-sum-exp)``, 8 bytes a row, written in
the forward's one read of the logits; the backward op recomputes the gradient from the logits (saved
for it) and those statistics, one read of the logits and one write of their gradient. Math and the
reason over computing the gradient in the forward: see ``kernels``.
"""

from __future__ import annotations

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.cross_entropy.kernels import (
    CrossEntropyConfig,
    SourceKernels,
    cross_entropy_bwd,
    cross_entropy_fwd,
    default_config,
)
from autokernel.lowering.launch import cached_choice, define_plain_op, load_source_kernels, run_with_fallback
from autokernel.lowering.pattern import dtype_name

PATTERN = "cross_entropy"


def pattern_key(reduction: str, ignore_index: int, label_smoothing: float, x_dtype: torch.dtype,
                out_dtype: torch.dtype) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel.

    ``upcast``: the model computes the loss in a wider dtype than the logits (``logits.float()``)."""
    upcast = int(out_dtype != x_dtype)
    return (f"{PATTERN}/reduction={reduction},ignore_index={int(ignore_index)},"
            f"smoothing={float(label_smoothing):g},x={dtype_name(x_dtype)},upcast={upcast}")


FWD_KERNEL, BWD_KERNEL = "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"  # names a source entry defines


def source_kernels(root: str, source: str) -> SourceKernels:
    """The kernel pair a source text defines (loaded under ``root``); ValueError when it lacks one."""
    return SourceKernels(*load_source_kernels(root, source, (FWD_KERNEL, BWD_KERNEL)))


def _shape(t: torch.Tensor) -> tuple[int, int]:
    vocab = t.shape[-1] if t.dim() else 1
    return vocab, t.numel() // max(vocab, 1)


def _memo_key(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir) -> tuple:
    vocab, rows = _shape(logits)
    return (PATTERN, cache_dir, logits.device, reduction, ignore_index, label_smoothing, logits.dtype, out_dtype,
            vocab, row_bucket(rows))


def select_config(logits: torch.Tensor, reduction: str, ignore_index: int, label_smoothing: float,
                  out_dtype: torch.dtype, cache_dir: str) -> tuple[CrossEntropyConfig, SourceKernels | None]:
    """The tuned configuration (and kernels, for a source entry) for this call's shape, else the
    built-in heuristic. Runs on every call: after the first call per shape bucket it is one dict read."""
    memo_key = _memo_key(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir)
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        vocab, rows = _shape(logits)
        key = pattern_key(reduction, ignore_index, label_smoothing, logits.dtype, out_dtype)
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, logits.device, key, vocab, rows,
                                                        CrossEntropyConfig, source_kernels, _default(logits))
    return chosen


def _default(logits: torch.Tensor) -> CrossEntropyConfig:
    vocab, rows = _shape(logits)
    return default_config(vocab, row_bucket(rows), logits.dtype)


def _launch(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir, run):
    return run_with_fallback(
        select_config(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir), run, PATTERN, logits,
        lambda: (_memo_key(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir), _default(logits)))


def _forward(logits, labels, ignore_index, label_smoothing, reduction, out_dtype, cache_dir, with_stats: bool,
             traceable: bool):
    return _launch(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir,
                   lambda config, kernels: cross_entropy_fwd(
                       logits, labels, ignore_index, label_smoothing, reduction, out_dtype, config, with_stats,
                       kernels=kernels, traceable=traceable))


def _backward(dloss, logits, labels, stats, ignore_index, label_smoothing, reduction, out_dtype, cache_dir,
              traceable: bool):
    return _launch(logits, reduction, ignore_index, label_smoothing, out_dtype, cache_dir,
                   lambda config, kernels: cross_entropy_bwd(dloss, logits, labels, stats, ignore_index,
                                                             label_smoothing, reduction, config, kernels=kernels,
                                                             traceable=traceable))


def _loss_like(logits: torch.Tensor, labels: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    shape = (labels.numel(),) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=out_dtype)


def _define_ops(suffix: str, inline: bool) -> None:
    """Define ``autokernel::cross_entropy{suffix}``, ``cross_entropy_train{suffix}`` and
    ``cross_entropy_backward{suffix}``.

    Two flavours of the same three ops, as for RMSNorm (see ``autokernel.lowering.rms_norm.ops``): opaque
    (``torch.library.custom_op`` or a plain ``Library`` op; picks its configuration on every call, serves symbolic
    shapes and the Triton interpreter) and inline (``torch.library.triton_op``; Inductor launches the kernels from
    its own generated code, configuration picked at trace time: static shapes only).
    """
    define = torch.library.triton_op if inline else torch.library.custom_op

    def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                reduction: str, out_dtype: torch.dtype, cache_dir: str) -> torch.Tensor:
        return _forward(logits, labels, ignore_index, label_smoothing, reduction, out_dtype, cache_dir, False,
                        inline)[0]

    def train(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
              reduction: str, out_dtype: torch.dtype, cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(logits, labels, ignore_index, label_smoothing, reduction, out_dtype, cache_dir, True,
                        inline)

    def backward(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                 ignore_index: int, label_smoothing: float, reduction: str, out_dtype: torch.dtype,
                 cache_dir: str) -> torch.Tensor:
        return _backward(dloss, logits, labels, stats, ignore_index, label_smoothing, reduction, out_dtype,
                         cache_dir, inline)

    define_plain_op(f"autokernel::cross_entropy{suffix}", forward, inline=inline,
                    fake=lambda logits, labels, ignore_index, label_smoothing, reduction, out_dtype, cache_dir:
                    _loss_like(logits, labels, reduction, out_dtype))
    backward_op = define_plain_op(
        f"autokernel::cross_entropy_backward{suffix}", backward, inline=inline,
        fake=lambda dloss, logits, labels, stats, ignore_index, label_smoothing, reduction, out_dtype, cache_dir:
        torch.empty_like(logits, memory_format=torch.contiguous_format))
    train_op = define(f"autokernel::cross_entropy_train{suffix}", train, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body
        train_op.register_fake(lambda logits, labels, ignore_index, label_smoothing, reduction, out_dtype,
                               cache_dir: (_loss_like(logits, labels, reduction, out_dtype),
                                           logits.new_empty((labels.numel(), 2), dtype=torch.float32)))

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, label_smoothing, reduction, out_dtype, cache_dir = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.args = (ignore_index, label_smoothing, reduction, out_dtype, cache_dir)

    def train_backward(ctx, dloss, _dstats):
        logits, labels, stats = ctx.saved_tensors
        return backward_op(dloss, logits, labels, stats, *ctx.args), None, None, None, None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
