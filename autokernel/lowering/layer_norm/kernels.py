"""Triton LayerNorm forward and backward, with fused, deterministic weight and bias gradients.

Notation, for one row ``x`` of width ``H`` (a normalized shape over several trailing dims is one row of
their product; everything is computed in float32 inside the kernels)::

    mean = sum(x) / H                                   saved (float32, one per row)
    r    = rsqrt(sum((x - mean)^2) / H + eps)           saved as ``rstd`` (biased variance, as torch)
    xhat = (x - mean) * r
    fp32:    y = xhat * w + b                           (torch's layer_norm: one rounding, at the end)
    rounded: y = float32(round_to_x_dtype(xhat)) * w + b   (``w * n.to(dtype) + b`` in hand-written code)

``w`` = 1 and ``b`` = 0 when absent. Backward, given ``dy``::

    g  = dy * w
    dx = r * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat                     (rounded: xhat rounded to x's dtype, as eager autograd)
    db = sum over rows of dy

``d xhat / d x = r * (I - 1 1^T / H - xhat xhat^T / H)`` is symmetric, which gives ``dx`` above.

The backward computes ``dw`` and ``db`` in the same pass as ``dx``: a persistent grid of ``P`` programs
each walks rows ``pid, pid + P, ...``, keeps its share of ``dw`` and ``db`` in float32 and writes it to
row ``pid`` of two ``[P, H]`` float32 buffers, which one more kernel sums over ``P``. The
summation order is fixed, so the result is bitwise reproducible (no atomics).

Two kernel shapes: *single pass* holds the whole row in registers (``BLOCK_N = next_power_of_2(H)``)
and corrects its float32 mean once, ``mean += mean(x - mean)``, before the variance of ``x - mean``;
*chunked* walks the row in chunks of ``block_n`` columns and reads it twice (statistics, then output).
The chunked forward takes the row's first element as a shift before summing, ``var = E[(x - x0)^2] -
E[x - x0]^2``: one pass for both moments without the cancellation of ``E[x^2] - E[x]^2`` when
``|mean| >> std``. The chunked backward read-modify-writes its partial ``dw``/``db`` rows chunk by chunk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import ROW_COUNT_UNSPECIALIZED, KernelConfig, as_rows, next_power_of_2, sm_count

MODES = ("fp32", "rounded")
MAX_SINGLE_PASS_BLOCK = 32768
_DEFAULT_CHUNK = 4096
# The single-pass backward prefetches the next row's x and dy only up to this width: the prefetch doubles
# the registers a row takes (the same limit as RMSNorm's, measured there on H100/H200).
_PREFETCH_MAX_BLOCK = 8192
# Largest tile (columns x partial rows) of the partial-gradient reduction: its two float32 accumulators take
# 2 * tile / (32 * warps) registers a thread, 64 at 16384 with 16 warps... 256 with 4.
MAX_SUM_TILE = 16384


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _layer_norm_fwd_single_kernel(
    X,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDED: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program normalizes ``ROWS_PER_PROGRAM`` consecutive rows, each held whole in registers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    # Scalars arrive as Python floats; pin them to fp32 so the arithmetic below never widens.
    eps = tl.cast(eps, tl.float32)
    # Weight and bias are shared by every row of this program: load them once.
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        # The last program's rows past the end are clamped to the last row, recomputed and stored again
        # with the same values: a row mask would stop the compiler from vectorizing the column mask.
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        row64 = tl.cast(row, tl.int64)  # rows * stride can pass 2**31
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        # One correction step: the float32 sum of a row whose mean is far larger than its spread loses the
        # low bits of the mean, which the variance and every output would inherit. The row is in registers.
        mean += tl.sum(tl.where(mask, x - mean, 0.0), axis=0) / n_cols
        # Masked lanes must not add (0 - mean)^2 to the variance.
        xc = tl.where(mask, x - mean, 0.0)
        r = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        y = xc * r
        if ROUNDED:
            y = y.to(X.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_STATS:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, r)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _layer_norm_fwd_chunked_kernel(
    X,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDED: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Like the single-pass kernel, but the row is read in ``BLOCK_N``-wide chunks, twice."""
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    eps = tl.cast(eps, tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        y_row = Y + row64 * stride_y
        # Pass 1: both moments of x - x0 (see the module docstring), accumulated elementwise and reduced
        # once at the end: cheaper and more accurate than scalar running sums.
        shift = tl.load(x_row).to(tl.float32)
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            acc1 += d
            acc2 += d * d
        m1 = tl.sum(acc1, axis=0) / n_cols
        var = tl.maximum(tl.sum(acc2, axis=0) / n_cols - m1 * m1, 0.0)
        mean = shift + m1
        r = tl.math.rsqrt(var + eps)
        # Pass 2: normalize, scale, shift.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * r
            if ROUNDED:
                y = y.to(X.dtype.element_ty).to(tl.float32)
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_STATS:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, r)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _layer_norm_bwd_single_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Persistent backward: program ``pid`` takes rows ``pid, pid + P, ...`` and writes one partial dW
    row and one partial dB row."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # This program's shares of dW and dB stay in registers for the whole loop.
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Software pipelining by hand: the next row's x and dy are loaded before this row's math, so its loads
    # overlap this row's reductions. The read past the last row is clamped to the last row (wasted but
    # valid), which keeps the column mask vectorizable.
    if PREFETCH:
        first = tl.cast(tl.minimum(pid, n_rows - 1), tl.int64)
        x_next = tl.load(X + first * stride_x + cols, mask=mask, other=0.0)
        dy_next = tl.load(DY + first * stride_dy + cols, mask=mask, other=0.0)
    for row in range(pid, n_rows, num_programs):
        row64 = tl.cast(row, tl.int64)
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            ahead = tl.cast(tl.minimum(row + num_programs, n_rows - 1), tl.int64)
            x_next = tl.load(X + ahead * stride_x + cols, mask=mask, other=0.0)
            dy_next = tl.load(DY + ahead * stride_dy + cols, mask=mask, other=0.0)
        else:
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row)
        # Masked lanes: xhat = 0 and g = 0, so they drop out of both means.
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * r, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=0) / n_cols
        c2 = tl.sum(g, axis=0) / n_cols
        dx = r * (g - c2 - xhat * c1)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            if ROUNDED:
                # Eager autograd multiplies dy by the rounded value the forward actually used.
                xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    part = tl.cast(pid, tl.int64) * n_cols + cols
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + part, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + part, db_acc, mask=mask)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _layer_norm_bwd_chunked_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent, chunked backward. The partial buffers must be zero-filled: each program
    read-modify-writes its own row of them, chunk by chunk, so no other program touches that memory."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_N)
    dw_row = DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols
    db_row = DB_PARTIAL + tl.cast(pid, tl.int64) * n_cols
    for row in range(pid, n_rows, num_programs):
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        dy_row = DY + row64 * stride_dy
        dx_row = DX + row64 * stride_dx
        mean = tl.load(MEAN + row)
        r = tl.load(RSTD + row)
        # Pass 1: the row's sums of g * xhat and of g.
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            acc1 += g * tl.where(mask, (x - mean) * r, 0.0)
            acc2 += g
        c1 = tl.sum(acc1, axis=0) / n_cols
        c2 = tl.sum(acc2, axis=0) / n_cols
        # Pass 2: dx, and this row's share of the program's partial dW and dB.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * r
            if HAS_WEIGHT:
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                g = dy
            dx = r * (g - c2 - xhat * c1)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            # Same pointers and block shape for the load and the store, so each element is reloaded by the
            # thread that stored it on this program's previous row.
            if HAS_WEIGHT:
                if ROUNDED:
                    xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
                tl.store(dw_row + cols, tl.load(dw_row + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)
            if HAS_BIAS:
                tl.store(db_row + cols, tl.load(db_row + cols, mask=mask, other=0.0) + dy, mask=mask)


@triton.jit
def _layer_norm_sum_partials_kernel(
    DW_PARTIAL,
    DB_PARTIAL,
    DW,
    DB,
    n_programs,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dw = sum(DW_PARTIAL, 0)``, ``db = sum(DB_PARTIAL, 0)`` over the ``[P, H]`` partials, in a fixed
    order, cast to the parameters' dtypes: one launch for both gradients."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_programs, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        offsets = tl.cast(rows, tl.int64)[:, None] * n_cols + cols[None, :]
        mask = (rows < n_programs)[:, None] & col_mask[None, :]
        if HAS_WEIGHT:
            dw += tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerNormConfig(KernelConfig):
    """Launch parameters of the forward and backward kernels.

    ``block_n == 0`` selects the single-pass backward (the whole row in one block); a power of two selects
    the chunked backward with that chunk width. ``fwd_block_n`` does the same for the forward, on its own (a
    backward that must chunk a wide row does not make the forward read it twice: RMSNorm's forward at
    2048x32768 took 0.134 ms chunked, 0.098 whole, on an H100). ``num_stages`` is the software-pipelining depth
    handed to the compiler (it matters for the chunked kernels' loops).

    The partial-gradient reduction after the backward sums the ``[P, H]`` float32 partials (P = programs of the
    backward) over P: ``sum_block_n`` columns a program (``H / sum_block_n`` programs), ``sum_block_p`` partial
    rows a step, ``sum_num_warps`` warps. The default, 16 columns and 512 rows a step on 8 warps, sums the 264
    partials of H = 4096 (2 programs per SM, 132 SMs) in one step on 256 programs: 3.6 us against 6.3 for the
    earlier 32 x 64 on 4 warps, LayerNorm 8192x4096's backward 0.0816 ms against 0.0844 on an H100
    (``results/layer_norm_sum_tiles_h100.txt``); the other tiles are the tuner's to try.
    """

    fwd_num_warps: int = 8
    fwd_rows_per_program: int = 1
    bwd_num_warps: int = 8
    bwd_programs_per_sm: int = 2
    block_n: int = 0
    num_stages: int = 1
    fwd_block_n: int = 0
    sum_block_n: int = 16
    sum_block_p: int = 512
    sum_num_warps: int = 8

    def __post_init__(self) -> None:
        self._check_common(warps=("fwd_num_warps", "bwd_num_warps", "sum_num_warps"),
                           positive=("fwd_rows_per_program", "bwd_programs_per_sm", "num_stages", "sum_block_n",
                                     "sum_block_p"),
                           chunks=("block_n", "fwd_block_n", "sum_block_n", "sum_block_p"),
                           max_chunk=MAX_SINGLE_PASS_BLOCK)
        if self.sum_block_n * self.sum_block_p > MAX_SUM_TILE:
            raise ValueError(f"LayerNormConfig: sum_block_n * sum_block_p must be <= {MAX_SUM_TILE} (registers), "
                             f"got {self.sum_block_n} * {self.sum_block_p}")

    @property
    def sum_tile(self) -> tuple[int, int, int]:
        """The partial-gradient reduction's ``(sum_block_n, sum_block_p, sum_num_warps)``."""
        return self.sum_block_n, self.sum_block_p, self.sum_num_warps

    @property
    def chunked(self) -> bool:
        """The backward walks each row in chunks."""
        return self.block_n != 0

    @property
    def fwd_chunked(self) -> bool:
        return self.fwd_block_n != 0



def default_config(hidden: int, rows: int, dtype: torch.dtype) -> LayerNormConfig:
    """A heuristic starting point: about 8-16 elements per thread, chunked when the row is too wide.
    (``dtype`` is accepted so that a tuned table can key on it; the heuristic does not need it.)"""
    del dtype
    block = next_power_of_2(hidden)
    if block > MAX_SINGLE_PASS_BLOCK:
        return LayerNormConfig(fwd_num_warps=8, bwd_num_warps=8, bwd_programs_per_sm=2, block_n=_DEFAULT_CHUNK,
                               fwd_block_n=_DEFAULT_CHUNK)
    warps = min(16, max(1, block // 512))
    # Measured on an H100 (backward alone, 8192x4096 bf16, benchmarks/sweep_norm.py): 8 warps x 2 programs
    # per SM 0.0842 ms, 16 x 2 (the old default, twice the threads) 0.1052. So ~16 elements per thread,
    # ~16 warps per SM, as RMSNorm's backward.
    bwd_warps = min(16, max(1, block // 512))
    # Narrow rows leave a program little work: batch rows in the forward when there are plenty of them.
    rows_per_program = 4 if block <= 1024 and rows >= 4096 else 1
    # Persistent backward: enough programs per SM to hide latency, few enough to keep the [P, H] partial
    # buffers (written, then read back by the reduction: 16 bytes per program and column with a weight and
    # a bias) small next to the rows (6 bytes per row and column in bf16): P <= rows / 16 or so.
    programs_per_sm = max(1, min(8, 16 // bwd_warps, rows // 2048))
    return LayerNormConfig(fwd_num_warps=warps, fwd_rows_per_program=rows_per_program, bwd_num_warps=bwd_warps,
                           bwd_programs_per_sm=programs_per_sm)


@functools.lru_cache(maxsize=256)  # configs are frozen dataclasses; this runs on every launch
def effective_config(config: LayerNormConfig, hidden: int) -> LayerNormConfig:
    """A config valid for rows of width ``hidden`` (:meth:`KernelConfig.fit_chunks`, each pass's chunk width)."""
    return config.fit_chunks(hidden, ("fwd_block_n", "block_n"), _DEFAULT_CHUNK, MAX_SINGLE_PASS_BLOCK)


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm_ndim: int,
           mode: str) -> tuple[int, ...]:
    """The normalized shape (the trailing ``norm_ndim`` dims of ``x``), after checking the inputs."""
    if mode not in MODES:
        raise ValueError(f"layer_norm: mode must be one of {MODES}, got {mode!r}")
    if not 1 <= norm_ndim <= x.dim():
        raise ValueError(f"layer_norm: norm_ndim must be in [1, x.dim()={x.dim()}], got {norm_ndim}")
    shape = tuple(x.shape[x.dim() - norm_ndim:])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"layer_norm: {name} shape {tuple(t.shape)} != normalized shape {shape}")
    return shape


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    norm_ndim: int,
    mode: str,
    out_dtype: torch.dtype,
    config: LayerNormConfig,
    save_stats: bool,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm of ``x`` over its trailing ``norm_ndim`` dims. Returns ``y`` (x's shape, contiguous,
    ``out_dtype``) and, with ``save_stats``, ``mean`` and ``rstd`` (float32, ``x.shape[:-norm_ndim]``),
    else ``None`` twice. ``traceable``: launch through ``wrap_triton``, so that under torch.compile
    Inductor sees the kernel and launches it itself (called from a ``triton_op``)."""
    norm_shape = _check(x, weight, bias, norm_ndim, mode)
    hidden = math.prod(norm_shape)
    lead = tuple(x.shape[: x.dim() - norm_ndim])
    x2 = as_rows(x, hidden)
    rows = x2.shape[0]
    y = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
    mean = rstd = None
    if save_stats:
        mean = torch.empty((rows,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows > 0 and hidden > 0:
        cfg = effective_config(config, hidden)
        kernel = _layer_norm_fwd_chunked_kernel if cfg.fwd_chunked else _layer_norm_fwd_single_kernel
        if traceable:
            kernel = wrap_triton(kernel)
        w = weight.reshape(-1).contiguous() if weight is not None else None
        b = bias.reshape(-1).contiguous() if bias is not None else None
        rpp = cfg.fwd_rows_per_program
        kernel[((rows + rpp - 1) // rpp,)](
            x2,
            w if w is not None else x2,  # dummy pointers, never read without the weight or the bias
            b if b is not None else x2,
            y,
            mean if mean is not None else y,  # dummy pointers, never written without SAVE_STATS
            rstd if rstd is not None else y,
            x2.stride(0),
            y.stride(0),
            rows,
            hidden,
            float(eps),
            HAS_WEIGHT=w is not None,
            HAS_BIAS=b is not None,
            ROUNDED=mode == "rounded",
            SAVE_STATS=save_stats,
            ROWS_PER_PROGRAM=rpp,
            BLOCK_N=cfg.fwd_block_n if cfg.fwd_chunked else next_power_of_2(hidden),
            num_warps=cfg.fwd_num_warps,
            num_stages=cfg.num_stages,
        )
    elif save_stats and rows > 0:
        # Statistics of an empty row are NaN, as in eager.
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
    if not save_stats:
        return y.view(x.shape), None, None
    return y.view(x.shape), mean.view(lead), rstd.view(lead)


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm_ndim: int,
    mode: str,
    config: LayerNormConfig,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`layer_norm_fwd` (``traceable``: as there). ``bias`` is only looked at for its
    shape and dtype. Returns ``dx`` (x's shape and dtype, contiguous), ``dw`` (weight's dtype) and ``db``
    (bias's dtype), ``None`` for an absent weight or bias. ``dw`` and ``db`` are reduced in a fixed order:
    deterministic."""
    norm_shape = _check(x, weight, bias, norm_ndim, mode)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"layer_norm_bwd: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    hidden = math.prod(norm_shape)
    x2 = as_rows(x, hidden)
    dy2 = as_rows(dy, hidden)
    rows = x2.shape[0]
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != rows:
            raise ValueError(f"layer_norm_bwd: {name} has {t.numel()} elements, expected {rows}")
    mean1 = mean.reshape(-1).to(torch.float32).contiguous()
    rstd1 = rstd.reshape(-1).to(torch.float32).contiguous()
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows == 0 or hidden == 0:
        return (dx.view(x.shape), torch.zeros_like(weight) if weight is not None else None,
                torch.zeros_like(bias) if bias is not None else None)
    cfg = effective_config(config, hidden)
    programs = min(rows, sm_count(x.device) * cfg.bwd_programs_per_sm)
    # The chunked kernel accumulates into its partial rows, so they start from zero; the single-pass kernel
    # writes its rows whole.
    alloc = torch.zeros if cfg.chunked else torch.empty
    dw_partial = alloc((programs, hidden), dtype=torch.float32, device=x.device) if weight is not None else dx
    db_partial = alloc((programs, hidden), dtype=torch.float32, device=x.device) if bias is not None else dx
    if cfg.chunked:
        kernel, extra = _layer_norm_bwd_chunked_kernel, {"BLOCK_N": cfg.block_n}
    else:
        block = next_power_of_2(hidden)
        kernel, extra = _layer_norm_bwd_single_kernel, {"BLOCK_N": block, "PREFETCH": block <= _PREFETCH_MAX_BLOCK}
    if traceable:
        kernel = wrap_triton(kernel)
    w = weight.reshape(-1).contiguous() if weight is not None else None
    kernel[(programs,)](
        dy2,
        x2,
        w if w is not None else x2,  # dummy pointer, never read without the weight
        mean1,
        rstd1,
        dx,
        dw_partial,  # dx stands in for an absent weight's or bias's partial: never touched
        db_partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        rows,
        hidden,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ROUNDED=mode == "rounded",
        num_warps=cfg.bwd_num_warps,
        num_stages=cfg.num_stages,
        **extra,
    )
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else None
    if dw is not None or db is not None:
        # One launch reduces both partials and casts them to the parameters' dtypes.
        reduce = wrap_triton(_layer_norm_sum_partials_kernel) if traceable else _layer_norm_sum_partials_kernel
        reduce[(triton.cdiv(hidden, cfg.sum_block_n),)](
            dw_partial,
            db_partial,
            dw if dw is not None else dx,  # dummy pointers, never written without the weight or the bias
            db if db is not None else dx,
            programs,
            hidden,
            HAS_WEIGHT=dw is not None,
            HAS_BIAS=db is not None,
            BLOCK_P=cfg.sum_block_p,
            BLOCK_N=cfg.sum_block_n,
            num_warps=cfg.sum_num_warps,
        )
    return dx.view(x.shape), dw, db


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    norm_ndim: int,
    mode: str,
) -> torch.Tensor:
    """Float64 LayerNorm with the kernels' semantics; differentiable (autograd gives the reference grads).

    ``mode == "rounded"`` rounds ``xhat`` to x's dtype before the affine, straight-through: the rounded
    value enters the forward (and so ``dw``), the gradient flows to ``x`` in float64, as the kernel's does.
    The result stays float64.
    """
    _check(x, weight, bias, norm_ndim, mode)
    dims = tuple(range(x.dim() - norm_ndim, x.dim()))
    x64 = x.double()
    mean = x64.mean(dims, keepdim=True)
    var = (x64 - mean).pow(2).mean(dims, keepdim=True)
    y = (x64 - mean) * torch.rsqrt(var + eps)
    if mode == "rounded":
        y = y + (y.to(x.dtype).double() - y).detach()
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y
