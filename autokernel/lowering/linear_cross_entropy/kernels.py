"""Linear + cross-entropy, chunked over rows: the logits and their gradient exist one chunk at a time.

Notation: ``h`` ``[N, H]`` (the hidden states, flattened to rows), ``W`` ``[V, H]`` (the lm_head), an optional
bias ``b`` ``[V]``, labels ``y`` ``[N]``; ``t`` is the logits' dtype (that of ``h`` and ``W``). The model
computes::

    z    = round_t(h @ W^T + b)                       the matmul's output, in t
    loss = CE(z.float(), y)                           ignore_index, label smoothing, reduction: see
                                                      autokernel.lowering.cross_entropy.kernels
    G    = round_t(d loss / d z)                      the backward of .float() rounds the gradient to t
    dh = G @ W,    dW = G^T @ h,    db = sum_rows G

For reductions 'mean' and 'sum' the loss is a scalar, so the gradients for an upstream gradient ``g`` are
``g`` times those for ``g = 1``: they are all computed in the forward, and the backward only scales them.
Per chunk of ``C`` rows ``[s, s + C)``::

    Z          = h[s:s+C] @ W^T (+ b)     cuBLAS (torch.mm / addmm) into a [C, V] buffer of dtype t
    CE kernel:   the rows' losses, and G written over Z in place (each row is read whole before any of
                 its gradient is written; 'mean' scales by 1 / n_valid of the whole batch)
    dh[s:s+C]  = G @ W                    cuBLAS into the slice of dh
    dW        += G^T @ h[s:s+C]           cuBLAS addmm into dW, in W's dtype (one rounding per chunk, as Liger)
    db        += sum_rows G               a float32 accumulator, rounded to b's dtype at the end

Reduction 'none' gives one loss per row, and ``dW = sum_r g_r G_r^T h_r`` needs the upstream gradient
``g`` before the products are summed: the forward computes the losses alone and the backward recomputes
each chunk's ``G``, scales its rows by ``g`` and then forms the products (one matmul more than 'mean').

Memory beyond the inputs: ``dh`` (N x H), ``dW`` (V x H), ``db`` and one ``[C, V]`` buffer; never an
``[N, V]`` tensor, nor a float32 copy of any logits. At 8192 x 4096 -> 128256 in bf16 with ``C = 1024``: dh
64 MiB, dW 1002 MiB, chunk 250.5 MiB.

When the model also reads the logits (HF returns them), they are written once, whole, into that ``[N, V]``
output, and training goes over them instead (:func:`_train_over_kept_logits`): each row chunk's matmul
writes its logits there and the cross-entropy kernel its losses and row statistics ``(max, log S)``; then
the gradient is recomputed from the kept logits one vocabulary slice of ``S`` columns at a time into an
``[N, S]`` buffer (``train_slice_cols``)::

    G_s        = grad(Z[:, v:v+S])        the cross-entropy backward kernel, from the kept logits and stats
    dW[v:v+S]  = G_s^T @ h                cuBLAS, each row of dW written once (no read-modify-write per chunk)
    dh        += G_s @ W[v:v+S]           cuBLAS addmm into dh (one rounding per slice)
    db[v:v+S]  = sum_rows G_s

The buffer is sized by bytes like the chunk (16384 columns at 8192 rows in bf16: 256 MiB, where the row
chunks' gradient buffer took 2048 rows x 128256 = 501 MiB), and ``dW``'s per-chunk re-reads are gone.

``C`` (``fwd_chunk_rows``, ``train_chunk_rows``) trades memory against the matmuls' efficiency and against
re-reading ``dW``: every chunk reads and writes all of ``dW`` (2 GB per chunk at 128256 x 4096), which stays
below the matmul's own time while ``C`` is a few hundred rows or more; :func:`max_chunk_bytes` caps the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from autokernel.lowering.cross_entropy.kernels import (
    LABEL_DTYPES,
    REDUCTIONS,
    CrossEntropyConfig,
    SourceKernels,
    count_valid,
    launch_grad,
    launch_rows,
    reduce_loss,
)
from autokernel.lowering.cross_entropy.kernels import default_config as ce_default_config
from autokernel.lowering.launch import KernelConfig

CHUNK_BYTES = 256 * 2**20  # the default chunk buffer: 1024 rows of a 128256 bf16 vocabulary
LARGE_CHUNK_BYTES = 512 * 2**20  # the default where the memory budget has room for it
MIN_CHUNK_CAP_BYTES = 320 * 2**20  # every shape may try a buffer this large
MEMORY_BUDGET_BYTES = 1.4 * 2**30  # dW + dh + the chunk buffer: the 1.4 GiB at 8192x4096->128256
ROW_MULTIPLE = 128  # chunk rows: a multiple of cuBLAS's row tiles
MAX_DEFAULT_ROWS = 16384  # a small vocabulary gains nothing from larger chunks (the matmuls are long enough)


@dataclass(frozen=True)
class LinearCrossEntropyConfig(KernelConfig):
    """Rows per chunk and the cross-entropy kernel's launch parameters, for the forward alone (``fwd_*``) and
    for the pass that also computes the gradients (``train_*``): see
    :class:`autokernel.lowering.cross_entropy.kernels.CrossEntropyConfig`. ``train_slice_cols``: vocabulary
    columns per gradient slice when the logits are kept (the training pass over them, see the module
    docstring)."""

    fwd_chunk_rows: int = 1024
    train_chunk_rows: int = 1024
    train_slice_cols: int = 16384
    fwd_num_warps: int = 16
    fwd_block_n: int = 8192
    train_num_warps: int = 32
    train_block_n: int = 16384
    num_stages: int = 1

    def __post_init__(self) -> None:
        self._check_common(("fwd_num_warps", "train_num_warps"),
                           positive=("fwd_chunk_rows", "train_chunk_rows", "train_slice_cols", "num_stages"))
        self.ce_config()  # the cross-entropy fields' own checks, with their messages

    def ce_config(self) -> CrossEntropyConfig:
        return _ce_config(self.fwd_num_warps, self.fwd_block_n, self.train_num_warps, self.train_block_n,
                          self.num_stages)


def _ce_config(fwd_num_warps: int, fwd_block_n: int, train_num_warps: int, train_block_n: int,
               num_stages: int) -> CrossEntropyConfig:
    return CrossEntropyConfig(fwd_num_warps=fwd_num_warps, fwd_block_n=fwd_block_n, train_num_warps=train_num_warps,
                              train_block_n=train_block_n, num_stages=num_stages)


def chunk_rows_for(vocab: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """The most rows (a multiple of :data:`ROW_MULTIPLE`, at least one multiple) whose ``[rows, vocab]``
    buffer fits in ``budget`` bytes."""
    rows = budget // max(vocab * itemsize, 1)
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def slice_cols_for(rows: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """The most vocabulary columns (a multiple of :data:`ROW_MULTIPLE`, at least one multiple) whose
    ``[rows, cols]`` gradient slice fits in ``budget`` bytes."""
    cols = budget // max(rows * itemsize, 1)
    return max(ROW_MULTIPLE, cols // ROW_MULTIPLE * ROW_MULTIPLE)


def max_chunk_bytes(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """The largest chunk buffer a candidate may take: what the memory budget leaves beside ``dW`` and ``dh``,
    and never less than :data:`MIN_CHUNK_CAP_BYTES`. Larger chunks make the ``dh = G @ W`` matmul wide
    enough to fill the GPU and re-read ``dW`` fewer times (8192x2048->128256 on an H200, GPU time: 22.0 ms
    at 1024 rows, 20.4 ms at 4096, Inductor 20.8)."""
    grads = (vocab * hidden + rows * hidden) * itemsize
    return int(max(MIN_CHUNK_CAP_BYTES, MEMORY_BUDGET_BYTES - grads))


def default_config(rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> LinearCrossEntropyConfig:
    """A heuristic starting point: a chunk buffer of about :data:`CHUNK_BYTES` (1024 rows at a 128256
    vocabulary in bf16, 4096 at 32000), up to :data:`LARGE_CHUNK_BYTES` where the memory budget leaves room
    (a small hidden size: 2048 rows at 8192x2048->128256, measured 20.9 ms against 22.0 at 1024 rows on an
    H200), gradient slices of about :data:`CHUNK_BYTES` over the kept logits (16384 columns at 8192 rows in
    bf16), and the cross-entropy family's own default for the vocabulary."""
    ce = ce_default_config(vocab, 1, dtype)
    room = max_chunk_bytes(rows, hidden, vocab, dtype.itemsize)
    budget = LARGE_CHUNK_BYTES if room >= LARGE_CHUNK_BYTES else CHUNK_BYTES
    chunk = min(chunk_rows_for(vocab, dtype.itemsize, budget), MAX_DEFAULT_ROWS)
    cols = min(slice_cols_for(rows, dtype.itemsize), vocab)
    return LinearCrossEntropyConfig(fwd_chunk_rows=chunk, train_chunk_rows=chunk, train_slice_cols=cols,
                                    fwd_num_warps=ce.fwd_num_warps,
                                    fwd_block_n=ce.fwd_block_n, train_num_warps=ce.train_num_warps,
                                    train_block_n=ce.train_block_n, num_stages=ce.num_stages)


class Grads(NamedTuple):
    """Which gradients a call computes (a frozen lm_head needs no ``dW``, a frozen trunk no ``dh``)."""

    x: bool
    weight: bool
    bias: bool

    def any(self) -> bool:
        return self.x or self.weight or self.bias


NO_GRADS = Grads(False, False, False)


class Result(NamedTuple):
    """The loss (a scalar for 'mean'/'sum', ``[N]`` for 'none', in ``out_dtype``), the logits when kept
    (``x``'s leading shape + ``[V]``), and the gradients asked for (``dx`` of ``x``'s shape, ``dw`` and
    ``db`` of the parameters'), each None when not computed."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    dx: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
           reduction: str) -> tuple[int, int, int]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x [..., H] and weight [V, H] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    vocab, hidden = weight.shape
    if vocab == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (classes)")
    if x.dtype != weight.dtype or not x.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: x and weight must share one floating dtype, got {x.dtype} and "
                         f"{weight.dtype}")
    if bias is not None and (bias.shape != (vocab,) or bias.dtype != x.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be [{vocab}] of {x.dtype}, got {tuple(bias.shape)} "
                         f"of {bias.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"linear_cross_entropy: labels must be int64 or int32 class indices, got {labels.dtype}")
    rows = x.shape[:-1].numel()
    if labels.numel() != rows:
        raise ValueError(f"linear_cross_entropy: labels hold {labels.numel()} elements for {rows} rows of x "
                         f"{tuple(x.shape)}")
    return rows, hidden, vocab


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as ``[rows, hidden]``, a view when the leading dims can be merged (cuBLAS takes a row stride)."""
    return t.reshape(-1, hidden)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    out_dtype: torch.dtype,
    config: LinearCrossEntropyConfig,
    grads: Grads = NO_GRADS,
    keep_logits: bool = False,
    dloss_rows: torch.Tensor | None = None,
    kernels: SourceKernels | None = None,
) -> Result:
    """Cross-entropy of ``x @ weight.T (+ bias)`` against ``labels``, chunk by chunk (see the module docstring).

    ``grads``: the gradients to compute, of the loss for an upstream gradient of 1 ('mean'/'sum'), or, with
    ``dloss_rows`` (reduction 'none', the backward's recomputation), for the upstream gradient
    ``dloss_rows`` (one value per row); the loss is not computed then. ``keep_logits``: also return the
    logits (written once, in their dtype). ``kernels``: cross-entropy kernels from a cache entry's source.
    """
    rows, hidden, vocab = _check(x, weight, bias, labels, reduction)
    if grads.any() and reduction == "none" and dloss_rows is None:
        raise ValueError("linear_cross_entropy: reduction 'none' computes gradients only from dloss_rows (the "
                         "backward's recomputation)")
    if dloss_rows is not None and (reduction != "none" or dloss_rows.numel() != rows):
        raise ValueError(f"linear_cross_entropy: dloss_rows must hold one value per row ({rows}) with reduction "
                         f"'none', got {dloss_rows.numel()} with {reduction!r}")
    device, dtype = x.device, x.dtype
    h = _rows(x, hidden)
    y = labels.reshape(-1).contiguous()  # the kernel reads one label per row at unit stride
    n_valid = count_valid(y, ignore_index)
    loss_rows = torch.empty((rows,), dtype=torch.float32, device=device)
    logits = torch.empty((rows, vocab), dtype=dtype, device=device) if keep_logits else None
    dx = torch.empty((rows, hidden), dtype=dtype, device=device) if grads.x else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if grads.weight else None
    db32 = torch.zeros((vocab,), dtype=torch.float32, device=device) if grads.bias and bias is not None else None
    want_grad = grads.any()
    if keep_logits and want_grad and dloss_rows is None:
        _train_over_kept_logits(h, weight, bias, y, logits, loss_rows, n_valid, dx, dw, db32, ignore_index,
                                label_smoothing, reduction, config, kernels)
    else:
        _chunks_over_rows(h, weight, bias, y, logits, loss_rows, n_valid, dx, dw, db32, dloss_rows, want_grad,
                          ignore_index, label_smoothing, reduction, config, kernels)
    if dw is not None and rows == 0:
        dw.zero_()
    loss = None if dloss_rows is not None else reduce_loss(loss_rows, n_valid, reduction, out_dtype)
    lead = tuple(x.shape[:-1])
    return Result(
        loss,
        logits.view(*lead, vocab) if logits is not None else None,
        dx.view(x.shape) if dx is not None else None,
        dw,
        db32.to(dtype) if db32 is not None else None,
    )


def _logits_into(z: torch.Tensor, h: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``z = h @ W^T (+ bias)``, cuBLAS writing into ``z``."""
    if bias is not None:
        torch.addmm(bias, h, wt, out=z)
    else:
        torch.mm(h, wt, out=z)


def _chunks_over_rows(h, weight, bias, y, logits, loss_rows, n_valid, dx, dw, db32, dloss_rows, want_grad: bool,
                      ignore_index, label_smoothing, reduction, config, kernels) -> None:
    """The row-chunked pass (see the module docstring): each chunk's logits (into ``logits`` when kept, else
    into the buffer), its losses and, when gradients are wanted, its gradient in the buffer and the chunk's
    share of ``dx``, ``dW`` and ``db``."""
    rows, vocab = h.shape[0], weight.shape[0]
    chunk = max(1, min(config.train_chunk_rows if want_grad else config.fwd_chunk_rows, rows))
    # One buffer for every chunk: the logits when they are not kept, the gradient when it is wanted.
    buffer = (torch.empty((chunk, vocab), dtype=h.dtype, device=h.device)
              if rows and (want_grad or logits is None) else None)
    ce = config.ce_config()
    wt = weight.t()
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        n = stop - start
        h_c = h[start:stop]
        z = logits[start:stop] if logits is not None else buffer[:n]
        _logits_into(z, h_c, wt, bias)
        g = buffer[:n] if want_grad else None
        launch_rows(z, y[start:stop], loss_rows[start:stop], g, n_valid, ignore_index, label_smoothing,
                    reduction, ce, kernels=kernels)
        if g is None:
            continue
        if dloss_rows is not None:  # 'none': the kernel wrote each row's gradient unscaled
            g.mul_(dloss_rows[start:stop].reshape(-1, 1).to(h.dtype))
        if dx is not None:
            torch.mm(g, weight, out=dx[start:stop])
        if dw is not None:
            if start == 0:
                torch.mm(g.t(), h_c, out=dw)
            else:
                dw.addmm_(g.t(), h_c)
        if db32 is not None:
            db32 += g.sum(0, dtype=torch.float32)


def _train_over_kept_logits(h, weight, bias, y, logits, loss_rows, n_valid, dx, dw, db32, ignore_index,
                            label_smoothing, reduction, config, kernels) -> None:
    """The training pass when the logits are kept whole (the model returns them): first each row chunk's
    logits, written into ``logits``, with their losses and row statistics; then the gradient one slice of
    the vocabulary at a time, recomputed from the kept logits into a ``[rows, slice]`` buffer, each slice
    giving its rows of ``dW`` and ``db`` whole (written once, not read and written per row chunk) and its
    share of ``dx`` (accumulated in ``dx``'s dtype, one rounding per slice, as ``dW`` per chunk in the
    row-chunked pass)."""
    rows, vocab = h.shape[0], weight.shape[0]
    if rows == 0:
        return
    ce = config.ce_config()
    wt = weight.t()
    stats = torch.empty((rows, 2), dtype=torch.float32, device=h.device)
    chunk = max(1, min(config.train_chunk_rows, rows))
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        z = logits[start:stop]
        _logits_into(z, h[start:stop], wt, bias)
        launch_rows(z, y[start:stop], loss_rows[start:stop], None, n_valid, ignore_index, label_smoothing,
                    reduction, ce, kernels=kernels, stats=stats[start:stop])
    # The tuned width, capped where the batch has more rows than the tuned shape: the buffer stays in budget.
    cap = slice_cols_for(rows, h.dtype.itemsize, max_chunk_bytes(rows, h.shape[1], vocab, h.dtype.itemsize))
    width = max(1, min(config.train_slice_cols, cap, vocab))
    buffer = torch.empty((rows, width), dtype=h.dtype, device=h.device)
    one = torch.ones((), dtype=torch.float32, device=h.device)  # the gradient for an upstream gradient of 1
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        g = buffer[:, :v1 - v0]
        launch_grad(logits[:, v0:v1], y, stats, one, n_valid, g, v0, vocab, ignore_index, label_smoothing,
                    reduction, ce, kernels=kernels)
        if dw is not None:
            torch.mm(g.t(), h, out=dw[v0:v1])
        if dx is not None:
            if v0 == 0:
                torch.mm(g, weight[v0:v1], out=dx)
            else:
                dx.addmm_(g, weight[v0:v1])
        if db32 is not None:
            db32[v0:v1] = g.sum(0, dtype=torch.float32)


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    dloss: torch.Tensor,
    keep_logits: bool = False,
    chunk_rows: int = 1024,
) -> dict[str, torch.Tensor]:
    """The model's math in float64, chunked so that no float64 tensor of the whole batch's logits exists.

    The logits are rounded to ``x``'s dtype as the model's matmul writes them (the loss of a bf16 model is
    the loss of its bf16 logits); everything else is float64. ``dloss``: the upstream gradient of the loss
    (a scalar, or one value per row for 'none'). Returns ``loss`` (float64) and ``dx``, ``dw`` (float32:
    a float64 dW of a 128256 x 4096 head is 4 GiB), with a bias ``db``, with ``keep_logits`` the rounded
    ``logits``."""
    rows, hidden, vocab = _check(x, weight, bias, labels, reduction)
    h = _rows(x.detach(), hidden).double()
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    y = labels.reshape(-1)
    n_valid = (y != ignore_index).sum()
    d = dloss.detach().double().reshape(-1)
    # d loss / d (per-row loss): what the reduction makes of the upstream gradient
    row_grad = d.expand(rows) / n_valid if reduction == "mean" else d.expand(rows)
    losses, dx = [], torch.empty((rows, hidden), dtype=torch.float64, device=x.device)
    dw = torch.zeros((vocab, hidden), dtype=torch.float64, device=x.device)
    db = torch.zeros((vocab,), dtype=torch.float64, device=x.device)
    logits = torch.empty((rows, vocab), dtype=x.dtype, device=x.device) if keep_logits else None
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        z = h[start:stop] @ w.t()
        if b is not None:
            z += b
        z = z.to(x.dtype)
        if logits is not None:
            logits[start:stop] = z
        z = z.double().requires_grad_(True)
        per_row = torch.nn.functional.cross_entropy(z, y[start:stop], ignore_index=ignore_index, reduction="none",
                                                    label_smoothing=label_smoothing)
        (g,) = torch.autograd.grad(per_row, z, row_grad[start:stop])
        losses.append(per_row.detach())
        dx[start:stop] = g @ w
        dw.addmm_(g.t(), h[start:stop])
        db += g.sum(0)
    per_row = torch.cat(losses) if losses else torch.zeros((0,), dtype=torch.float64, device=x.device)
    loss = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / n_valid}[reduction]
    out = {"loss": loss, "dx": dx.view(x.shape).float(), "dw": dw.float()}
    if bias is not None:
        out["db"] = db.float()
    if logits is not None:
        out["logits"] = logits.view(*x.shape[:-1], vocab)
    return out
