"""Triton cross-entropy: the loss and each row's logsumexp in one read of the logits; the gradient
recomputed from them in the backward.

Notation, for one row ``x`` of ``C`` logits with label ``y`` and label smoothing ``e`` (everything in
float32 inside the kernels; ``M = max(x)``, ``S = sum_j exp(x_j - M)``, so ``lse = M + log S``)::

    ignored row (y == ignore_index):  loss = 0, grad = 0
    loss = lse - (1 - e) * x_y - (e / C) * sum_j x_j
         = log S + (1 - e) * (M - x_y) + e * (M - mean_j x_j)
    p_j  = exp((x_j - M) - log S)
    grad_j = (p_j - e / C - (1 - e) * [j == y]) * s      s = 1 / n_valid for reduction 'mean', else 1

``n_valid`` is the number of rows that are not ignored (counted on the device: no host sync). The
loss of reduction 'mean' is ``sum(loss) / n_valid`` (NaN when every row is ignored, as in PyTorch),
'sum' is ``sum(loss)``, 'none' the per-row losses; the per-row losses are reduced by ``torch.sum``
after the kernel, in a fixed order: deterministic. ``x - M`` is exact in float32 (``M`` is one of the
``x``), which keeps ``p`` accurate for logits of magnitude 1e4, where ``x - lse`` would lose 1e-3.

Forward: one program per row. A row that fits in one block is read once and held in registers. A wider
row is walked in ``BLOCK_N``-wide chunks with an online max (one reduction per chunk) and per-lane sums
of exponentials rescaled as the max grows (one exp per element). It writes the row's loss and, for the
backward, the row's statistics ``(M, log S)`` (8 bytes a row: ``M`` apart, for the accuracy above). With
``HAS_GRAD`` it also writes the gradient for an upstream gradient of 1, walking the row again (from L2
when few rows are in flight: one per SM): the chunked linear + cross-entropy uses that, in place of a
chunk's logits that it never keeps.

Backward: ``dlogits = grad * dloss`` (``dloss`` a scalar for 'mean'/'sum', one value per row for
'none'), recomputed from the logits and the saved statistics by a 2-D grid of (row, column block)
programs: one read of the logits, one write of their gradient. Writing the gradient in the forward
instead (Liger's way) costs that write in the forward and, for a functional op, a read and a write of
the gradient in the backward to scale it: four logits-sized passes against three. Liger saves the
backward's pair by writing the gradient over the logits, which a functional op may not do.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import KernelConfig, is_power_of_two, next_power_of_2

logger = logging.getLogger("autokernel")

REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK = 32768
LABEL_DTYPES = (torch.int64, torch.int32)


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    X,
    LABELS,
    LOSS,
    STATS,
    DX,
    N_VALID,
    stride_x,
    stride_dx,
    n_cols,
    ignore_index,
    label_smoothing,
    HAS_STATS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per row: the row's loss, with ``HAS_STATS`` its ``(M, log S)`` (``STATS[row, 0:2]``),
    with ``HAS_GRAD`` its gradient. A row that fits in one block (``SINGLE``: ``n_cols <= BLOCK_N``) is
    read once and kept in registers; a wider one is read in chunks (twice with ``HAS_GRAD``)."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2**31 for 8192 x 128256 logits
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    cols0 = tl.arange(0, BLOCK_N)
    label = tl.load(LABELS + row).to(tl.int64)
    # Scalars arrive as Python floats; pin them to fp32 so the arithmetic below never widens.
    eps = tl.cast(label_smoothing, tl.float32)
    if label != ignore_index:
        if SINGLE:
            mask = cols0 < n_cols
            x = tl.load(x_row + cols0, mask=mask, other=float("-inf")).to(tl.float32)
            row_max = tl.max(x, axis=0)
            e = tl.exp(x - row_max)  # masked lanes: exp(-inf) = 0
            sum_e = tl.sum(e, axis=0)
            if SMOOTHING:
                sum_x = tl.sum(tl.where(mask, x, 0.0), axis=0)
        else:
            # Pass 1: a running max per chunk (one reduction per chunk) and per-lane sums of exp(x - max),
            # rescaled when the max grows: one exp per element.
            row_max = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_N], dtype=tl.float32)
            sx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + cols0
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(row_max, tl.max(x, axis=0))
                # While every logit so far is -inf (a masked vocabulary prefix), shift by 0, not by -inf:
                # exp(-inf - -inf) would be NaN.
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(row_max - shift) + tl.exp(x - shift)
                row_max = m_new
                if SMOOTHING:
                    sx += tl.where(mask, x, 0.0)
            sum_e = tl.sum(s, axis=0)
            if SMOOTHING:
                sum_x = tl.sum(sx, axis=0)
        log_s = tl.log(sum_e)
        # Labels outside [0, C) are not checked (that would need a host sync); the mask keeps the read
        # inside the row.
        x_y = tl.load(x_row + label, mask=(label >= 0) & (label < n_cols), other=0.0).to(tl.float32)
        loss = log_s + (1.0 - eps) * (row_max - x_y)
        if SMOOTHING:
            loss += eps * (row_max - sum_x / n_cols)
        tl.store(LOSS + row, loss)
        if HAS_STATS:
            tl.store(STATS + 2 * row, row_max)
            tl.store(STATS + 2 * row + 1, log_s)
        if HAS_GRAD:
            scale = 1.0
            if MEAN:
                scale = 1.0 / tl.load(N_VALID).to(tl.float32)
            smooth = eps / n_cols
            if SINGLE:
                g = tl.where(cols0 == label, e / sum_e - (1.0 - eps), e / sum_e) - smooth
                tl.store(dx_row + cols0, (g * scale).to(DX.dtype.element_ty), mask=mask)
            else:
                # Pass 2: the gradient, chunk by chunk (the row mostly comes from L2 this time).
                for start in range(0, n_cols, BLOCK_N):
                    cols = start + cols0
                    mask = cols < n_cols
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                    g = tl.exp((x - row_max) - log_s) - smooth
                    g = tl.where(cols == label, g - (1.0 - eps), g)
                    tl.store(dx_row + cols, (g * scale).to(DX.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if HAS_STATS:  # unread by the backward; written so that the op's outputs are deterministic
            tl.store(STATS + 2 * row, 0.0)
            tl.store(STATS + 2 * row + 1, 0.0)
        if HAS_GRAD:
            zero = tl.zeros([BLOCK_N], dtype=DX.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + cols0
                tl.store(dx_row + cols, zero, mask=cols < n_cols)


@triton.jit
def _cross_entropy_bwd_kernel(
    X,
    LABELS,
    STATS,
    DLOSS,
    N_VALID,
    DX,
    stride_x,
    stride_dx,
    n_cols,
    col_offset,
    n_classes,
    ignore_index,
    label_smoothing,
    PER_ROW: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dx[row, cols]``, the gradient for the upstream gradient ``dloss``, recomputed for one (row,
    column block) from the row's logits, label and forward statistics ``(M, log S)``. ``X`` and ``DX`` hold
    ``n_cols`` columns: classes ``col_offset`` to ``col_offset + n_cols`` of ``n_classes`` (a slice of the
    vocabulary, for linear + cross-entropy; the whole row otherwise)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dx_ptrs = DX + row * stride_dx + cols
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(dx_ptrs, tl.zeros([BLOCK_N], dtype=DX.dtype.element_ty), mask=mask)
    else:
        if PER_ROW:
            scale = tl.load(DLOSS + row).to(tl.float32)
        else:
            scale = tl.load(DLOSS).to(tl.float32)
        if MEAN:
            scale = scale / tl.load(N_VALID).to(tl.float32)
        row_max = tl.load(STATS + 2 * row)
        log_s = tl.load(STATS + 2 * row + 1)
        eps = tl.cast(label_smoothing, tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp((x - row_max) - log_s) - eps / n_classes
        g = tl.where(cols + col_offset == label, g - (1.0 - eps), g)
        tl.store(dx_ptrs, (g * scale).to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------



class SourceKernels(NamedTuple):
    """Kernels a cache entry brings as source text (written by the tuning agent), in place of the built-in
    pair. The contract is the built-in kernels' parameter lists: ``fwd(X, LABELS, LOSS, STATS, DX, N_VALID,
    stride_x, stride_dx, n_cols, ignore_index, label_smoothing, HAS_STATS, HAS_GRAD, MEAN, SMOOTHING, SINGLE,
    BLOCK_N)`` on a grid of ``(rows,)`` writing one float32 loss per row (0 for ignored rows), with
    ``HAS_STATS`` the row's float32 ``(M, log S)`` at ``STATS[2 * row]``, ``STATS[2 * row + 1]``, with
    ``HAS_GRAD`` the gradient row; ``bwd(X, LABELS, STATS, DLOSS, N_VALID, DX, stride_x, stride_dx, n_cols,
    col_offset, n_classes, ignore_index, label_smoothing, PER_ROW, MEAN, BLOCK_N)`` on a grid of
    ``(rows, cdiv(n_cols, BLOCK_N))`` writing the gradient for the upstream gradient ``DLOSS`` of classes
    ``col_offset`` to ``col_offset + n_cols`` of ``n_classes``."""

    fwd: Any
    bwd: Any


@dataclass(frozen=True)
class CrossEntropyConfig(KernelConfig):
    """Launch parameters of the three launches: the forward kernel computing the loss (``fwd_*``; with the
    statistics for the backward too), the same kernel also writing the gradient (``train_*``: it moves
    twice the bytes, so its best chunk and warps differ; linear + cross-entropy's chunks use it), and the
    backward kernel (``bwd_*``). Block widths are powers of two."""

    fwd_num_warps: int = 16
    fwd_block_n: int = 8192
    train_num_warps: int = 32
    train_block_n: int = 16384
    bwd_num_warps: int = 8
    bwd_block_n: int = 4096
    num_stages: int = 1

    def __post_init__(self) -> None:
        self._check_common(("fwd_num_warps", "train_num_warps", "bwd_num_warps"))
        for name in ("fwd_block_n", "train_block_n", "bwd_block_n"):
            v = getattr(self, name)
            if not is_power_of_two(v) or v > MAX_BLOCK:
                raise ValueError(f"CrossEntropyConfig.{name} must be a power of two <= {MAX_BLOCK}, got {v}")
        if self.num_stages <= 0:
            raise ValueError(f"CrossEntropyConfig.num_stages must be > 0, got {self.num_stages}")



def default_config(vocab: int, rows: int, dtype: torch.dtype) -> CrossEntropyConfig:
    """A heuristic starting point (register counts from ptxas for sm_90, bf16).

    Rows up to ``MAX_BLOCK`` wide are held whole in one block, about 32 elements per thread (32 warps at
    32768: 64 registers, so one row per SM). Wider rows are chunked: the loss alone in 8192-wide chunks
    (16 warps, 53 registers: two rows per SM), the gradient-writing kernel in 16384-wide chunks over 32
    warps (50 registers: one row per SM), which keeps the rows in flight (132 x 256 KB at a 128256 bf16
    vocabulary) within the 50 MB L2 that its second read of each row relies on.

    ``rows`` and ``dtype`` are accepted so that a tuned table can key on them; the heuristic ignores them.
    """
    del rows, dtype
    block = next_power_of_2(vocab)
    bwd_block = min(4096, block)
    bwd = {"bwd_num_warps": min(8, max(1, bwd_block // 512)), "bwd_block_n": bwd_block}
    if block <= MAX_BLOCK:
        warps = min(32, max(1, block // 1024))
        return CrossEntropyConfig(fwd_num_warps=warps, fwd_block_n=block, train_num_warps=warps,
                                  train_block_n=block, **bwd)
    return CrossEntropyConfig(fwd_num_warps=16, fwd_block_n=8192, train_num_warps=32, train_block_n=16384, **bwd)


@functools.lru_cache(maxsize=256)  # configs are frozen dataclasses; this runs on every launch
def effective_config(config: CrossEntropyConfig, vocab: int) -> CrossEntropyConfig:
    """Shrink block widths to the row (a chunk wider than the row only wastes lanes), so that a cached
    config runs on any vocabulary size."""
    block = next_power_of_2(vocab)
    widths = ("fwd_block_n", "train_block_n", "bwd_block_n")
    if all(getattr(config, w) <= block for w in widths):
        return config
    return CrossEntropyConfig(**{**config.to_dict(), **{w: min(getattr(config, w), block) for w in widths}})


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


def _check(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[int, int]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits must be [..., classes] with classes > 0, got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"cross_entropy: labels must be int64 or int32 class indices, got {labels.dtype}")
    vocab = logits.shape[-1]
    rows = logits.numel() // vocab
    if labels.numel() != rows:
        raise ValueError(f"cross_entropy: labels hold {labels.numel()} elements for {rows} rows of logits "
                         f"{tuple(logits.shape)}")
    return rows, vocab


def count_valid(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The number of rows not ignored, counted on the device: the kernel reads it, so 'mean' needs no host sync."""
    return (labels != ignore_index).sum()


def launch_rows(
    x2: torch.Tensor,
    labels: torch.Tensor,
    loss_rows: torch.Tensor,
    grad: torch.Tensor | None,
    n_valid: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    config: CrossEntropyConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
    stats: torch.Tensor | None = None,
) -> None:
    """Launch the forward kernel over the rows of ``x2`` (``[rows, C]``, unit column stride): write each
    row's float32 loss into ``loss_rows``, when ``stats`` is given (float32 ``[rows, 2]``, contiguous) the
    row's ``(M, log S)`` for the backward, and when ``grad`` is given (``[rows, C]``, unit column stride)
    the gradient of the reduced loss with respect to the row, scaled by ``1 / n_valid`` for 'mean'.

    ``n_valid`` may count more rows than ``x2`` holds (a chunk of a larger batch, the loss being the mean
    over the whole batch). ``grad`` may be ``x2`` itself: every program reads its row in full before it
    writes any of the row's gradient (the chunked linear + cross-entropy computes the gradient in place
    of the logits of its chunk).
    """
    rows, vocab = x2.shape
    if rows == 0:
        return
    cfg = effective_config(config, vocab)
    block = cfg.train_block_n if grad is not None else cfg.fwd_block_n
    kernel = kernels.fwd if kernels is not None else _cross_entropy_fwd_kernel
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[(rows,)](
        x2,
        labels,
        loss_rows,
        stats if stats is not None else loss_rows,  # dummy pointers, never written without HAS_STATS / HAS_GRAD
        grad if grad is not None else loss_rows,
        n_valid,
        x2.stride(0),
        grad.stride(0) if grad is not None else 0,
        vocab,
        int(ignore_index),
        float(label_smoothing),
        HAS_STATS=stats is not None,
        HAS_GRAD=grad is not None,
        MEAN=reduction == "mean",
        SMOOTHING=label_smoothing != 0.0,
        SINGLE=vocab <= block,
        BLOCK_N=block,
        num_warps=cfg.train_num_warps if grad is not None else cfg.fwd_num_warps,
        num_stages=cfg.num_stages,
    )


def reduce_loss(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The loss of ``reduction`` from the per-row losses, in a fixed order (deterministic)."""
    if reduction == "mean":
        # 0 / 0 = NaN when every row is ignored, as PyTorch's mean.
        loss = loss_rows.sum() / n_valid
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows
    return loss.to(out_dtype)


def cross_entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    out_dtype: torch.dtype,
    config: CrossEntropyConfig,
    with_stats: bool,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of ``logits`` (``[..., C]``, flattened to rows) against ``labels`` (one per row).

    Returns the loss (a scalar for 'mean'/'sum', ``[rows]`` for 'none', in ``out_dtype``) and, with
    ``with_stats``, each row's float32 ``(M, log S)`` (``[rows, 2]``: what :func:`cross_entropy_bwd`
    needs), else ``None``. ``kernels``: kernels from a cache entry's source (see :class:`SourceKernels`).
    ``traceable``: launch through ``wrap_triton`` (called from a ``triton_op``).
    """
    rows, vocab = _check(logits, labels, reduction)
    x2 = logits if logits.stride(-1) == 1 else logits.contiguous()
    x2 = x2.reshape(rows, vocab)
    y = labels.reshape(-1).contiguous()
    loss_rows = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    stats = torch.empty((rows, 2), dtype=torch.float32, device=logits.device) if with_stats else None
    n_valid = count_valid(y, ignore_index)
    launch_rows(x2, y, loss_rows, None, n_valid, ignore_index, label_smoothing, reduction, config, kernels=kernels,
                traceable=traceable, stats=stats)
    return reduce_loss(loss_rows, n_valid, reduction, out_dtype), stats


def launch_grad(
    x2: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    dloss: torch.Tensor,
    n_valid: torch.Tensor,
    grad: torch.Tensor,
    col_offset: int,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    config: CrossEntropyConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> None:
    """Launch the backward kernel: write into ``grad`` (``[rows, w]``, unit column stride) the gradient of
    the loss for the upstream gradient ``dloss`` (one value, or one per row for 'none') with respect to
    ``x2`` (``[rows, w]``, unit column stride): classes ``col_offset`` to ``col_offset + w`` of
    ``n_classes``, from the forward's ``stats`` (float32 ``[rows, 2]``, contiguous)."""
    rows, width = x2.shape
    if rows == 0 or width == 0:
        return
    cfg = effective_config(config, width)
    kernel = kernels.bwd if kernels is not None else _cross_entropy_bwd_kernel
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[(rows, triton.cdiv(width, cfg.bwd_block_n))](
        x2,
        labels,
        stats,
        dloss,
        n_valid,
        grad,
        x2.stride(0),
        grad.stride(0),
        width,
        int(col_offset),
        int(n_classes),
        int(ignore_index),
        float(label_smoothing),
        PER_ROW=reduction == "none",
        MEAN=reduction == "mean",
        BLOCK_N=cfg.bwd_block_n,
        num_warps=cfg.bwd_num_warps,
        num_stages=cfg.num_stages,
    )


def cross_entropy_bwd(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    config: CrossEntropyConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """The logits' gradient for the upstream gradient ``dloss`` of the loss (a scalar for 'mean'/'sum',
    one value per row for 'none'), from the logits, the labels and the forward's ``stats``. Returns a new
    tensor of the logits' shape and dtype."""
    rows, vocab = _check(logits, labels, reduction)
    per_row = reduction == "none"
    want = rows if per_row else 1
    if dloss.numel() != want:
        raise ValueError(f"cross_entropy_bwd: dloss has {dloss.numel()} elements, expected {want} "
                         f"(reduction {reduction!r})")
    if tuple(stats.shape) != (rows, 2) or stats.dtype != torch.float32:
        raise ValueError(f"cross_entropy_bwd: stats must be float32 [{rows}, 2] (the forward's), got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    x2 = (logits if logits.stride(-1) == 1 else logits.contiguous()).reshape(rows, vocab)
    y = labels.reshape(-1).contiguous()
    dx = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    launch_grad(x2, y, stats.contiguous(), dloss.reshape(-1).contiguous(), count_valid(y, ignore_index), dx, 0,
                vocab, ignore_index, label_smoothing, reduction, config, kernels=kernels, traceable=traceable)
    return dx.view(logits.shape)


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """Float64 cross-entropy with the kernels' semantics (logits flattened to ``[rows, C]``, labels to
    ``[rows]``); differentiable, so autograd gives the reference gradient."""
    rows, vocab = _check(logits, labels, reduction)
    return torch.nn.functional.cross_entropy(
        logits.double().reshape(rows, vocab), labels.reshape(-1), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing)
