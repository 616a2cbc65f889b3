"""Triton RMSNorm forward and backward, with a fused, deterministic weight gradient.

Notation, for one row ``x`` of width ``H`` (everything is computed in float32 inside the kernels)::

    r     = rsqrt(mean(x^2) + eps)                      saved as ``rstd`` (float32, one per row)
    n     = x * r
    w_eff = float32(w) + offset                         (w_eff = 1 when there is no weight)
    llama: y = float32(round_to_x_dtype(n)) * w_eff     (HF Llama: ``weight * h.to(input_dtype)``)
    gemma: y = n * w_eff                                (Gemma: ``(h * (1 + w.float())).type_as(x)``)

Backward, given ``dy``::

    g  = dy * w_eff
    dx = r * (g - n * mean(g * n))
    dw = sum over rows of dy * n                        (llama: n rounded to x's dtype, as eager autograd)

The derivation of ``dx``: ``dn/dx = r * (I - n n^T / H)`` is symmetric, so ``dx = r * (g - n * (n . g) / H)``.

The backward computes ``dw`` in the same pass as ``dx``: a persistent grid of ``P`` programs each walks
rows ``pid, pid + P, ...``, keeps its share of ``dw`` in float32 and writes it to row ``pid`` of a
``[P, H]`` float32 buffer, which the wrapper sums over ``P``. The summation order is fixed, so the result
is bitwise reproducible (no atomics).

Two kernel shapes: *single pass* holds the whole row in registers (``BLOCK_N = next_power_of_2(H)``);
*chunked* walks the row in chunks of ``block_n`` columns, reading it twice from memory (once for the
reduction, once for the output). The chunked backward keeps its partial ``dw`` in the ``[P, H]`` buffer
itself, read-modify-written chunk by chunk by the one program that owns that buffer row.

The *split* backward (``bwd_split_n``) is for rows too wide for a row's ``dw`` share to stay in registers:
one kernel computes each row's ``c = mean(g * n)`` (reading ``x`` and ``dy``), a second runs on a grid of
(column blocks of ``bwd_split_n``) x (row groups): program ``(j, k)`` takes rows ``k, k + K, ...`` of
column block ``j``, writes their ``dx`` and keeps its block's share of ``dw`` in registers, stored to row
``k`` of a ``[K, H]`` buffer summed as above. It reads ``x`` and ``dy`` twice from memory, but nothing
else: no ``[P, H]`` read-modify-write per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import (
    ROW_COUNT_UNSPECIALIZED,
    KernelConfig,
    as_rows,
    next_power_of_2,
    sm_count,
)

MODES = ("llama", "gemma")
MAX_SINGLE_PASS_BLOCK = 32768
# Chunk width the heuristic and ``effective_config`` fall back to for rows too wide for one block.
_DEFAULT_CHUNK = 4096
# The single-pass backward prefetches the next row only up to this width. Measured: on an H200 the
# prefetch cut 8192x8192 fwd+bwd from 0.212 to 0.194 ms; on an H100, 2048x16384 fwd+bwd with the
# prefetch took 1.17 ms (0.19 ms without it on the H200): the doubled row spills registers.
_PREFETCH_MAX_BLOCK = 8192
# The split backward's row-dot kernel reads a row in chunks this wide (8 warps: 16 elements a thread).
_ROW_DOT_BLOCK = 4096


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _rms_norm_fwd_single_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    offset,
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,
    SAVE_RSTD: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R=None,
    H=None,
    stride_r=0,
    stride_h=0,
    HAS_RESIDUAL: tl.constexpr = False,
):
    """One program normalizes ``ROWS_PER_PROGRAM`` consecutive rows, each held whole in registers.
    With ``HAS_RESIDUAL`` the row normalized is ``h = x + r`` (rounded to x's dtype, as eager's add),
    which is also stored to ``H``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    # Scalars arrive as Python floats; pin them to fp32 so the arithmetic below never widens.
    eps = tl.cast(eps, tl.float32)
    if HAS_WEIGHT:
        # The weight is shared by every row of this program: load it once.
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        # The last program's rows past the end are clamped to the last row: it is normalized again and
        # the same values are stored again. A row mask would cost more: the compiler can no longer prove
        # the column mask constant over 16-byte groups and falls back to scalar loads and stores.
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        mask = col_mask
        # 64-bit row offsets: rows * stride can pass 2**31 for large activations.
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + res).to(X.dtype.element_ty)
            tl.store(H + row64 * stride_h + cols, h, mask=mask)
            x = h.to(tl.float32)
        # Masked lanes hold 0, so they add nothing to the sum; divide by the true width.
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = x * r
        if LLAMA:
            # HF Llama casts the normalized row back to the input dtype before the weight multiply.
            n = n.to(X.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            y = n * w
        else:
            y = n
        tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_RSTD:
            tl.store(RSTD + row, r)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _rms_norm_fwd_chunked_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    offset,
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,
    SAVE_RSTD: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R=None,
    H=None,
    stride_r=0,
    stride_h=0,
    HAS_RESIDUAL: tl.constexpr = False,
):
    """Like the single-pass kernel, but the row is read in ``BLOCK_N``-wide chunks, twice. With
    ``HAS_RESIDUAL`` the first pass stores ``h`` and the second reads it back."""
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        # Rows past the end are clamped to the last row (recomputed, same values stored), as in the
        # single-pass kernel: a row mask would defeat vectorized loads.
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        width = n_cols
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        y_row = Y + row64 * stride_y
        # Pass 1: sum of squares. Accumulate elementwise and reduce once at the end, which is both
        # cheaper and more accurate than a scalar running sum.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, width, BLOCK_N):
            cols = start + cols0
            mask = cols < width
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                res = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
                h = (x + res).to(X.dtype.element_ty)
                # Same pointers and block layout as pass 2's load: each thread reads back what it wrote.
                tl.store(H + row64 * stride_h + cols, h, mask=mask)
                x = h.to(tl.float32)
            acc += x * x
        r = tl.math.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        # Pass 2: normalize and scale.
        for start in range(0, width, BLOCK_N):
            cols = start + cols0
            mask = cols < width
            if HAS_RESIDUAL:
                x = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            n = x * r
            if LLAMA:
                n = n.to(X.dtype.element_ty).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                y = n * w
            else:
                y = n
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_RSTD:
            tl.store(RSTD + row, r)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _rms_norm_bwd_single_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
    DH=None,
    stride_dh=0,
    HAS_DH: tl.constexpr = False,
):
    """Persistent backward: program ``pid`` takes rows ``pid, pid + P, ...``, writes one partial dW row.
    With ``HAS_DH`` (add + RMSNorm: ``X`` is ``h``), the gradient ``h`` gets from its other users is added."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    # This program's share of dW stays in registers for the whole loop.
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Software pipelining by hand: the next row's x and dy are loaded before this row's math, so the
    # loads of one row overlap the reductions of the previous one. The prefetch past the last row is
    # clamped to the last row (a wasted but valid read) to keep the column mask vectorizable.
    # Rows up to 8192 wide: the prefetch doubles the registers a row takes; wider rows would spill.
    row64 = tl.cast(pid, tl.int64)
    if PREFETCH:
        x_next = tl.load(X + row64 * stride_x + cols, mask=col_mask, other=0.0)
        dy_next = tl.load(DY + row64 * stride_dy + cols, mask=col_mask, other=0.0)
    for row in range(pid, n_rows, num_programs):
        row64 = tl.cast(row, tl.int64)
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            ahead = tl.cast(tl.minimum(row + num_programs, n_rows - 1), tl.int64)
            x_next = tl.load(X + ahead * stride_x + cols, mask=col_mask, other=0.0)
            dy_next = tl.load(DY + ahead * stride_dy + cols, mask=col_mask, other=0.0)
        else:
            x = tl.load(X + row64 * stride_x + cols, mask=col_mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=col_mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row)
        n = x * r
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        # Masked lanes have n == 0 and g == 0, so they drop out of the dot product.
        c = tl.sum(g * n, axis=0) / n_cols
        dx = r * (g - n * c)
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        if HAS_WEIGHT:
            if LLAMA:
                # Eager autograd multiplies dy by the rounded activation the forward actually used.
                n = n.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * n
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _rms_norm_bwd_chunked_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DH=None,
    stride_dh=0,
    HAS_DH: tl.constexpr = False,
):
    """Persistent, chunked backward (``HAS_DH``: as in the single-pass one). ``DW_PARTIAL`` must be
    zero-filled: each program read-modify-writes its own row of it, chunk by chunk, so no other program
    ever touches that memory."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_N)
    offset = tl.cast(offset, tl.float32)
    dw_row = DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols
    for row in range(pid, n_rows, num_programs):
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        dy_row = DY + row64 * stride_dy
        dx_row = DX + row64 * stride_dx
        r = tl.load(RSTD + row)
        # Pass 1: the row's dot product g . n.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                dy = dy * w
            acc += dy * (x * r)
        c = tl.sum(acc, axis=0) / n_cols
        # Pass 2: dx, and this row's contribution to the program's partial dW.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            n = x * r
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                g = dy * w
            else:
                g = dy
            dx = r * (g - n * c)
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                if LLAMA:
                    n = n.to(X.dtype.element_ty).to(tl.float32)
                # Same pointers, same block shape and layout as the store below, so each element is
                # reloaded by the thread that stored it on the previous row.
                part = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, part + dy * n, mask=mask)


@triton.jit  # no row count among its parameters: the grid has one program a row
def _rms_norm_bwd_row_dot_kernel(
    DY,
    X,
    W,
    RSTD,
    C,
    stride_dy,
    stride_x,
    n_cols,
    offset,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The split backward's first kernel: ``C[row] = mean(g * n) = r * sum(dy * w_eff * x) / H``, one
    program per row, the row read in ``BLOCK_N``-wide chunks."""
    row = tl.program_id(0)
    row64 = tl.cast(row, tl.int64)
    cols0 = tl.arange(0, BLOCK_N)
    offset = tl.cast(offset, tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + cols0
        mask = cols < n_cols
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
        acc += g * x
    tl.store(C + row, tl.sum(acc, axis=0) * tl.load(RSTD + row) / n_cols)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _rms_norm_bwd_split_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C,
    DH=None,
    stride_dh=0,
    HAS_DH: tl.constexpr = False,
):
    """The split backward's second kernel: program ``(j, k)`` takes column block ``j`` of rows ``k, k + K,
    ...`` (``K`` row groups), with each row's ``c`` from ``C``; writes one partial dW row per group. The
    parameters are the other backward kernels' (one launch call serves all three), plus ``C``."""
    block = tl.program_id(0)
    group = tl.program_id(1)
    groups = tl.num_programs(1)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(group, n_rows, groups):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row)
        n = x * r
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        dx = r * (g - n * tl.load(C + row))
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            if LLAMA:
                n = n.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * n
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + tl.cast(group, tl.int64) * n_cols + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------



class SourceKernels(NamedTuple):
    """Kernels a cache entry brings as source text (written by the tuning agent), in place of the
    built-in single-pass pair. The contract is the built-in kernels' parameter lists, minus
    ``PREFETCH``: ``fwd(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset, HAS_WEIGHT, LLAMA,
    SAVE_RSTD, ROWS_PER_PROGRAM, BLOCK_N)`` on a grid of ``cdiv(rows, ROWS_PER_PROGRAM)`` and ``bwd(DY, X,
    W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, HAS_WEIGHT, LLAMA,
    BLOCK_N)`` on the persistent grid, writing one float32 partial dW row per program. Rows wider than
    one block, and a config's chunked or split passes (``fwd_block_n``, ``block_n``, ``bwd_split_n``), still
    go to the built-in kernels. For add + RMSNorm (a ``residual`` flag in the
    pattern key) both also take the built-in kernels' trailing residual parameters (``R, H, stride_r,
    stride_h, HAS_RESIDUAL`` and ``DH, stride_dh, HAS_DH``)."""

    fwd: Any
    bwd: Any


@dataclass(frozen=True)
class RmsNormConfig(KernelConfig):
    """Launch parameters of the forward and backward kernels.

    ``block_n == 0`` selects the single-pass backward (the whole row in one block); a power of two selects
    the chunked backward with that chunk width. ``fwd_block_n`` does the same for the forward, on its own:
    a backward that streams a wide row in chunks does not force the forward to (at 2048x32768 on an H100 the
    whole-row forward took 0.098 ms, the chunked one 0.134). ``bwd_split_n > 0`` selects the split backward
    (column blocks of that width; ``block_n`` then unused). ``num_stages`` is the software-pipelining depth
    handed to the compiler (it only matters for the chunked kernels' loops).
    """

    fwd_num_warps: int = 8
    fwd_rows_per_program: int = 1
    bwd_num_warps: int = 8
    bwd_programs_per_sm: int = 4
    block_n: int = 0
    num_stages: int = 1
    fwd_block_n: int = 0
    bwd_split_n: int = 0

    def __post_init__(self) -> None:
        self._check_common(warps=("fwd_num_warps", "bwd_num_warps"),
                           positive=("fwd_rows_per_program", "bwd_programs_per_sm", "num_stages"),
                           chunks=("block_n", "fwd_block_n", "bwd_split_n"), max_chunk=MAX_SINGLE_PASS_BLOCK)

    @property
    def chunked(self) -> bool:
        """The backward walks each row in chunks."""
        return self.block_n != 0

    @property
    def fwd_chunked(self) -> bool:
        return self.fwd_block_n != 0


def default_config(hidden: int, rows: int, dtype: torch.dtype) -> RmsNormConfig:
    """A heuristic starting point: about 8-16 elements per thread, chunked when the row is too wide.

    ``dtype`` is accepted so that a tuned table can key on it; the heuristic itself does not need it.
    """
    del dtype
    block = next_power_of_2(hidden)
    if block > MAX_SINGLE_PASS_BLOCK:
        # Rows this wide spill registers in one block; stream them in chunks instead.
        return RmsNormConfig(
            fwd_num_warps=8,
            fwd_rows_per_program=1,
            bwd_num_warps=8,
            bwd_programs_per_sm=2,
            block_n=_DEFAULT_CHUNK,
            fwd_block_n=_DEFAULT_CHUNK,
        )
    if block == MAX_SINGLE_PASS_BLOCK:
        # Measured on an H100 at 2048x32768 (bf16, session 14's sweep, each pass alone): the single-pass backward
        # spills registers (2.1-3.0 ms); the split one with column blocks of 2048 at 4 warps x 4 programs per SM
        # took 0.241 ms (Inductor's backward 0.247, the best chunked one 0.363). The forward holds the whole
        # row (0.098 ms at 16 warps; chunked 0.116-0.147).
        return RmsNormConfig(fwd_num_warps=16, bwd_num_warps=4, bwd_programs_per_sm=4, bwd_split_n=2048)
    warps = min(16, max(1, block // 512))
    # Measured on an H200 (backward alone, bf16): 8192x2048 was fastest at 4 warps x 4 programs per SM,
    # 8192x4096 at 8 x 2; twice the warps cost 19% and 22%. So ~8 elements per thread, ~16 warps per SM.
    bwd_warps = min(16, max(1, block // 512))
    # Narrow rows leave each program with little work: batch rows in the forward so the launch is not
    # dominated by per-program overhead, but only when there are plenty of rows to go around.
    rows_per_program = 4 if block <= 1024 and rows >= 4096 else 1
    # Persistent backward: enough programs per SM to hide latency; more also means more partial dW rows
    # to sum afterwards.
    programs_per_sm = max(2, min(16, 16 // bwd_warps))
    if block == MAX_SINGLE_PASS_BLOCK // 2:
        # At 2048x16384 on an H100 (same sweep): 16 warps x 1 program per SM 0.101 ms, x 2 0.114.
        programs_per_sm = 1
    return RmsNormConfig(
        fwd_num_warps=warps,
        fwd_rows_per_program=rows_per_program,
        bwd_num_warps=bwd_warps,
        bwd_programs_per_sm=programs_per_sm,
        block_n=0,
    )


@functools.lru_cache(maxsize=256)  # configs are frozen dataclasses; this runs on every launch
def effective_config(config: RmsNormConfig, hidden: int) -> RmsNormConfig:
    """A config valid for rows of width ``hidden`` (:meth:`KernelConfig.fit_chunks`, each pass's chunk width)."""
    return config.fit_chunks(hidden, ("fwd_block_n", "block_n"), _DEFAULT_CHUNK, MAX_SINGLE_PASS_BLOCK)


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor | None, mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"rms_norm: mode must be one of {MODES}, got {mode!r}")
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension")
    hidden = x.shape[-1]
    if weight is not None and tuple(weight.shape) != (hidden,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({hidden},)")
    return hidden


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    mode: str,
    out_dtype: torch.dtype,
    config: RmsNormConfig,
    save_rstd: bool,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of ``x``. Returns ``y`` (x's shape, contiguous, ``out_dtype``) and
    ``rstd`` (float32, ``x.shape[:-1]``) or ``None`` when ``save_rstd`` is false. ``kernels``: kernels
    from a cache entry's source, used instead of the built-in single-pass ones (see :class:`SourceKernels`).
    ``traceable``: launch through ``wrap_triton``, so that under torch.compile Inductor sees the kernel
    and launches it itself (called from a ``triton_op``)."""
    y, rstd, _ = _fwd(x, None, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable)
    return y, rstd


def add_rms_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    mode: str,
    out_dtype: torch.dtype,
    config: RmsNormConfig,
    save_rstd: bool,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Add + RMSNorm: ``h = x + residual`` (rounded to x's dtype) and RMSNorm of ``h``, in one pass.
    Returns ``y``, ``h`` (x's shape and dtype, contiguous) and ``rstd`` (as :func:`rms_norm_fwd`)."""
    if tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    y, rstd, h = _fwd(x, residual, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable)
    return y, h, rstd


def _fwd(x, residual, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable):
    hidden = _check(x, weight, mode)
    x2 = as_rows(x, hidden)
    rows = x2.shape[0]
    y = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device) if save_rstd else None
    h = torch.empty((rows, hidden), dtype=x.dtype, device=x.device) if residual is not None else None
    shaped = (y.view(x.shape), rstd.view(x.shape[:-1]) if rstd is not None else None,
              h.view(x.shape) if h is not None else None)
    if rows == 0 or hidden == 0:
        if rstd is not None:
            # Mean over an empty row is NaN, as in eager.
            rstd.fill_(float("nan"))
        return shaped
    cfg = effective_config(config, hidden)
    w = weight.contiguous() if weight is not None else None
    rpp = cfg.fwd_rows_per_program
    if cfg.fwd_chunked:
        kernel, block = _rms_norm_fwd_chunked_kernel, cfg.fwd_block_n
    else:
        kernel = kernels.fwd if kernels is not None else _rms_norm_fwd_single_kernel
        block = next_power_of_2(hidden)
    extra = {}
    if kernels is None or cfg.fwd_chunked or residual is not None:
        # The residual parameters, always passed to the built-in kernels (Inductor's launcher for an
        # inline op wants every argument spelled out); a source kernel gets them for add + RMSNorm only.
        r2 = as_rows(residual, hidden) if residual is not None else x2
        extra = {"R": r2, "H": h if h is not None else y, "stride_r": r2.stride(0),
                 "stride_h": h.stride(0) if h is not None else 0, "HAS_RESIDUAL": residual is not None}
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[((rows + rpp - 1) // rpp,)](
        x2,
        w if w is not None else x2,  # dummy pointer, never read when HAS_WEIGHT is false
        y,
        rstd if rstd is not None else y,  # dummy pointer, never written when SAVE_RSTD is false
        x2.stride(0),
        y.stride(0),
        rows,
        hidden,
        float(eps),
        float(offset),
        HAS_WEIGHT=w is not None,
        LLAMA=mode == "llama",
        SAVE_RSTD=rstd is not None,
        ROWS_PER_PROGRAM=rpp,
        BLOCK_N=block,
        num_warps=cfg.fwd_num_warps,
        num_stages=cfg.num_stages,
        **extra,
    )
    return shaped


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    mode: str,
    config: RmsNormConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
    dh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`rms_norm_fwd` (``kernels``, ``traceable``: as there). Returns ``dx`` (x's shape
    and dtype, contiguous) and ``dw`` (weight's dtype) or ``None`` without a weight. ``dw`` is reduced in a
    fixed order: deterministic. For add + RMSNorm, ``x`` is ``h`` and ``dh`` the gradient ``h`` receives
    from its other users; ``dx`` then includes it (and is the gradient of both addends)."""
    hidden = _check(x, weight, mode)
    for name, t in (("dy", dy), ("dh", dh)):
        if t is not None and tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"rms_norm_bwd: {name} shape {tuple(t.shape)} != x shape {tuple(x.shape)}")
    x2 = as_rows(x, hidden)
    dy2 = as_rows(dy, hidden)
    rows = x2.shape[0]
    rstd1 = rstd.reshape(-1)
    if rstd1.numel() != rows:
        raise ValueError(f"rms_norm_bwd: rstd has {rstd1.numel()} elements, expected {rows}")
    rstd1 = rstd1.to(torch.float32).contiguous()
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows == 0 or hidden == 0:
        dw = torch.zeros_like(weight) if weight is not None else None
        return dx.view(x.shape), dw
    dh2 = as_rows(dh, hidden) if dh is not None else None
    cfg = effective_config(config, hidden)
    w = weight.contiguous() if weight is not None else None
    programs = min(rows, sm_count(x.device) * cfg.bwd_programs_per_sm)
    grid = (programs,)
    # The dh parameters: always for the built-in kernels, for a source kernel only with add + RMSNorm.
    residual_args = {"DH": dh2 if dh2 is not None else dx, "stride_dh": dh2.stride(0) if dh2 is not None else 0,
                     "HAS_DH": dh2 is not None}
    if cfg.bwd_split_n:
        # About as many programs as the persistent grid: column blocks x row groups.
        blocks = triton.cdiv(hidden, cfg.bwd_split_n)
        grid = (blocks, max(1, min(rows, programs // blocks)))
        c = _row_dots(dy2, x2, w, rstd1, offset, traceable)
        kernel, block, extra = _rms_norm_bwd_split_kernel, cfg.bwd_split_n, {"C": c, **residual_args}
    elif cfg.chunked:
        kernel, block, extra = _rms_norm_bwd_chunked_kernel, cfg.block_n, residual_args
    elif kernels is not None:
        kernel, block, extra = kernels.bwd, next_power_of_2(hidden), residual_args if dh is not None else {}
    else:
        block = next_power_of_2(hidden)
        kernel = _rms_norm_bwd_single_kernel
        extra = {"PREFETCH": block <= _PREFETCH_MAX_BLOCK, **residual_args}
    if w is not None:
        # One partial dW row per program (per row group when split). The chunked kernel accumulates into
        # the buffer, so it starts from zero; the others overwrite their row whole.
        alloc = torch.zeros if kernel is _rms_norm_bwd_chunked_kernel else torch.empty
        partial = alloc((grid[-1], hidden), dtype=torch.float32, device=x.device)
    else:
        partial = dx  # dummy pointer, never touched when HAS_WEIGHT is false
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[grid](
        dy2,
        x2,
        w if w is not None else x2,
        rstd1,
        dx,
        partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        rows,
        hidden,
        float(offset),
        HAS_WEIGHT=w is not None,
        LLAMA=mode == "llama",
        BLOCK_N=block,
        num_warps=cfg.bwd_num_warps,
        num_stages=cfg.num_stages,
        **extra,
    )
    dw = partial.sum(0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dw


def _row_dots(dy2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor | None, rstd: torch.Tensor, offset: float,
              traceable: bool) -> torch.Tensor:
    """The split backward's ``c`` of every row (float32), from its first kernel."""
    rows, hidden = x2.shape
    c = torch.empty((rows,), dtype=torch.float32, device=x2.device)
    block = min(next_power_of_2(hidden), _ROW_DOT_BLOCK)
    kernel = wrap_triton(_rms_norm_bwd_row_dot_kernel) if traceable else _rms_norm_bwd_row_dot_kernel
    kernel[(rows,)](dy2, x2, w if w is not None else x2, rstd, c, dy2.stride(0), x2.stride(0), hidden,
                    float(offset), HAS_WEIGHT=w is not None, BLOCK_N=block, num_warps=min(8, max(1, block // 512)))
    return c


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    mode: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Float64 RMSNorm with the kernels' semantics; differentiable (autograd gives the reference grads).

    ``mode == "llama"`` rounds ``n`` to x's dtype before the weight multiply, as eager HF Llama does. The
    rounding is applied straight-through: its value enters the forward (and so ``dw``), but the gradient
    flows to ``x`` in float64, as the kernel's does, rather than being rounded to x's dtype on the way.
    The result stays float64 (it is not rounded to ``out_dtype``, which is accepted for symmetry with
    :func:`rms_norm_fwd` and checked to be a floating dtype).
    """
    _check(x, weight, mode)
    if not out_dtype.is_floating_point:
        raise ValueError(f"rms_norm_reference: out_dtype must be floating point, got {out_dtype}")
    x64 = x.double()
    r = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    n = x64 * r
    if mode == "llama":
        n = n + (n.to(x.dtype).double() - n).detach()
    if weight is None:
        return n
    return n * (weight.double() + offset)
