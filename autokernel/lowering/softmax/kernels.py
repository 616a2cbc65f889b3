"""Triton softmax and log-softmax over the last dim, forward and backward.

Notation, for one row ``x`` of width ``H`` (everything is computed in float32 inside the kernels)::

    m = max(x)                       shift: exp never overflows
    d = sum(exp(x - m))
    softmax:      y = exp(x - m) / d
    log_softmax:  y = (x - m) - log(d)

``y`` is written in ``out_dtype`` (HF's ``softmax(x, dtype=float32).to(x.dtype)`` becomes one kernel: the
upcast and the downcast are the loads' and stores' conversions). Backward, given ``dy``, from the saved ``y``
alone (the forward's output, so nothing extra is stored)::

    softmax:      dx = y * (dy - sum(dy * y))          (J = diag(y) - y y^T is symmetric)
    log_softmax:  dx = dy - exp(y) * sum(dy)           (J = I - 1 softmax^T)

Both passes are one read of each input and one write of the output when the row fits in registers
(*single pass*, ``BLOCK_N = next_power_of_2(H)``), the DRAM floor. Rows too wide for that are *chunked*:
the forward makes one online pass for ``m`` and ``d`` (per lane, rescaling the running sum whenever the
running max grows, and combining the lanes once at the end) and a second pass that writes ``y``; the
backward makes one pass for its row sum and a second for ``dx``. Each row is reduced by one program in a
fixed order: results are bitwise reproducible.

A row whose entries are all ``-inf`` (a fully masked attention row) gives NaN, as eager does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import ROW_COUNT_UNSPECIALIZED, KernelConfig, as_rows, next_power_of_2

# Widest row a single-pass program holds in registers: 32768 float32 lanes over 32 warps are 32 per thread
# (64 for the backward's y and dy).
MAX_SINGLE_PASS_BLOCK = 32768
# Chunk width the heuristic and ``effective_config`` fall back to for rows too wide for one block.
_DEFAULT_CHUNK = 4096


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _softmax_fwd_single_kernel(
    X,
    Y,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program handles ``ROWS_PER_PROGRAM`` consecutive rows, each held whole in registers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    for i in range(ROWS_PER_PROGRAM):
        # Rows past the end are clamped to the last row: it is computed again and the same values are
        # stored again. A row mask would stop the compiler from proving the column mask constant over
        # 16-byte groups, and loads and stores would no longer be vectorized.
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        # 64-bit row offsets: rows * stride can pass 2**31 for attention scores.
        row64 = tl.cast(row, tl.int64)
        # Masked lanes load -inf: they leave the max alone and add exp(-inf) = 0 to the sum.
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32)
        z = x - tl.max(x, axis=0)
        e = tl.exp(z)
        d = tl.sum(e, axis=0)
        if LOG:
            y = z - tl.log(d)
        else:
            y = e * (1.0 / d)
        tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _softmax_fwd_chunked_kernel(
    X,
    Y,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over ``BLOCK_N``-wide chunks: one pass for the max and the sum, one for ``y``."""
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        y_row = Y + row64 * stride_y
        # Per-lane running max and sum, combined across lanes once after the loop: no reduction per chunk.
        m_lane = tl.full([BLOCK_N], -float("inf"), tl.float32)
        d_lane = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m_lane, x)
            # A lane that has seen only -inf keeps a zero sum; shifting by 0 there avoids -inf - -inf = NaN.
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            d_lane = d_lane * tl.exp(m_lane - shift) + tl.exp(x - shift)
            m_lane = m_new
        m = tl.max(m_lane, axis=0)
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        d = tl.sum(d_lane * tl.exp(m_lane - m_safe), axis=0)
        if LOG:
            log_d = tl.log(d)
        else:
            inv_d = 1.0 / d
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            if LOG:
                y = (x - m) - log_d
            else:
                y = tl.exp(x - m) * inv_d
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _softmax_bwd_single_kernel(
    DY,
    Y,
    DX,
    stride_dy,
    stride_y,
    stride_dx,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program handles ``ROWS_PER_PROGRAM`` consecutive rows of ``y`` and ``dy``, each held whole."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)  # clamped, as in the forward
        row64 = tl.cast(row, tl.int64)
        # Masked lanes load 0 for both: they add nothing to either row sum.
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row64 * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=0)
        else:
            dx = y * (dy - tl.sum(dy * y, axis=0))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=ROW_COUNT_UNSPECIALIZED)
def _softmax_bwd_chunked_kernel(
    DY,
    Y,
    DX,
    stride_dy,
    stride_y,
    stride_dx,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Like the single-pass backward, but in ``BLOCK_N``-wide chunks: one pass for the row sum, one for ``dx``."""
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(pid * ROWS_PER_PROGRAM + i, n_rows - 1)
        row64 = tl.cast(row, tl.int64)
        dy_row = DY + row64 * stride_dy
        y_row = Y + row64 * stride_y
        dx_row = DX + row64 * stride_dx
        # Accumulate per lane and reduce once: cheaper and more accurate than a scalar running sum.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + cols0
            mask = cols < n_cols
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * s
            else:
                dx = y * (dy - s)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


class SourceKernels(NamedTuple):
    """Kernels a cache entry brings as source text (written by the tuning agent), in place of the
    built-in single-pass pair. The contract is the built-in single-pass kernels' parameter lists:
    ``fwd(X, Y, stride_x, stride_y, n_rows, n_cols, LOG, ROWS_PER_PROGRAM, BLOCK_N)`` and ``bwd(DY, Y, DX,
    stride_dy, stride_y, stride_dx, n_rows, n_cols, LOG, ROWS_PER_PROGRAM, BLOCK_N)``, each on a grid of
    ``cdiv(rows, ROWS_PER_PROGRAM)`` with ``BLOCK_N = next_power_of_2(n_cols)``; ``Y`` is in the output dtype,
    ``DX`` in x's. Rows wider than one block, or a config that asks for chunks, still go to the built-in
    chunked kernels."""

    fwd: Any
    bwd: Any


@dataclass(frozen=True)
class SoftmaxConfig(KernelConfig):
    """Launch parameters of the forward and backward kernels.

    ``*_block_n == 0`` selects that pass's single-pass kernel (the whole row in one block); a power of two
    selects its chunked kernel with that chunk width. The passes choose apart: a chunked forward reads ``x``
    twice, a chunked backward reads ``y`` and ``dy`` twice, and where each starts to pay differs.
    ``num_stages`` is the software-pipelining depth handed to the compiler (it matters for the chunks' loops).
    """

    fwd_num_warps: int = 8
    fwd_rows_per_program: int = 1
    fwd_block_n: int = 0
    bwd_num_warps: int = 8
    bwd_rows_per_program: int = 1
    bwd_block_n: int = 0
    num_stages: int = 1

    def __post_init__(self) -> None:
        self._check_common(warps=("fwd_num_warps", "bwd_num_warps"),
                           positive=("fwd_rows_per_program", "bwd_rows_per_program", "num_stages"),
                           chunks=("fwd_block_n", "bwd_block_n"), max_chunk=MAX_SINGLE_PASS_BLOCK)



def default_config(hidden: int, rows: int, dtype: torch.dtype) -> SoftmaxConfig:
    """A heuristic starting point: about 16 elements per thread, chunked when the row is too wide.

    ``dtype`` is accepted so that a tuned table can key on it; the heuristic itself does not need it.
    """
    del dtype
    block = next_power_of_2(hidden)
    if block > MAX_SINGLE_PASS_BLOCK:
        return SoftmaxConfig(fwd_num_warps=8, bwd_num_warps=8, fwd_block_n=_DEFAULT_CHUNK, bwd_block_n=_DEFAULT_CHUNK)
    # 16 float32 lanes per thread in the forward (32 registers in the backward, which holds y and dy).
    warps = min(32, max(1, block // 512))
    # Narrow rows leave each program little work: batch rows so that launching programs does not dominate,
    # but only when there are plenty of rows to go around.
    rpp = 4 if block <= 1024 and rows >= 4096 else 1
    return SoftmaxConfig(fwd_num_warps=warps, fwd_rows_per_program=rpp, bwd_num_warps=warps,
                         bwd_rows_per_program=rpp)


@functools.lru_cache(maxsize=256)  # configs are frozen dataclasses; this runs on every launch
def effective_config(config: SoftmaxConfig, hidden: int) -> SoftmaxConfig:
    """A config valid for rows of width ``hidden`` (:meth:`KernelConfig.fit_chunks`, each pass's chunk width)."""
    return config.fit_chunks(hidden, ("fwd_block_n", "bwd_block_n"), _DEFAULT_CHUNK, MAX_SINGLE_PASS_BLOCK)


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"softmax: {what} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"softmax: {what} must have at least one dimension (softmax runs over the last)")


def softmax_fwd(
    x: torch.Tensor,
    log: bool,
    out_dtype: torch.dtype,
    config: SoftmaxConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """Softmax (``log``: log-softmax) over the last dim of ``x``, computed in float32, returned contiguous in
    ``out_dtype``. ``kernels``: single-pass kernels from a cache entry's source (see :class:`SourceKernels`).
    ``traceable``: launch through ``wrap_triton``, so that under torch.compile Inductor sees the kernel and
    launches it itself (called from a ``triton_op``)."""
    _check_float(x, "x")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"softmax: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    hidden = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = as_rows(x, hidden)
    rows = x2.shape[0]
    cfg = effective_config(config, hidden)
    rpp = cfg.fwd_rows_per_program
    if cfg.fwd_block_n:
        kernel, block = _softmax_fwd_chunked_kernel, cfg.fwd_block_n
    else:
        kernel, block = (kernels.fwd if kernels is not None else _softmax_fwd_single_kernel), next_power_of_2(hidden)
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[((rows + rpp - 1) // rpp,)](
        x2, y, x2.stride(0), hidden, rows, hidden,
        LOG=bool(log), ROWS_PER_PROGRAM=rpp, BLOCK_N=block, num_warps=cfg.fwd_num_warps, num_stages=cfg.num_stages,
    )
    return y


def softmax_bwd(
    dy: torch.Tensor,
    y: torch.Tensor,
    log: bool,
    x_dtype: torch.dtype,
    config: SoftmaxConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """Gradient of :func:`softmax_fwd` from its output ``y`` and the upstream ``dy`` (``kernels``, ``traceable``:
    as there). Returns ``dx`` contiguous, in ``x_dtype``, of ``y``'s shape."""
    _check_float(y, "y")
    _check_float(dy, "dy")
    if x_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"softmax_bwd: x_dtype must be float32, float16 or bfloat16, got {x_dtype}")
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"softmax_bwd: dy shape {tuple(dy.shape)} != y shape {tuple(y.shape)}")
    hidden = y.shape[-1]
    dx = torch.empty(y.shape, dtype=x_dtype, device=y.device)
    if dx.numel() == 0:
        return dx
    y2 = as_rows(y, hidden)
    dy2 = as_rows(dy, hidden)
    rows = y2.shape[0]
    cfg = effective_config(config, hidden)
    rpp = cfg.bwd_rows_per_program
    if cfg.bwd_block_n:
        kernel, block = _softmax_bwd_chunked_kernel, cfg.bwd_block_n
    else:
        kernel, block = (kernels.bwd if kernels is not None else _softmax_bwd_single_kernel), next_power_of_2(hidden)
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[((rows + rpp - 1) // rpp,)](
        dy2, y2, dx, dy2.stride(0), y2.stride(0), hidden, rows, hidden,
        LOG=bool(log), ROWS_PER_PROGRAM=rpp, BLOCK_N=block, num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages,
    )
    return dx


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


class _Float64Softmax(torch.autograd.Function):
    """Float64 softmax whose backward, like eager's, reads the output rounded to the dtype it is stored in."""

    @staticmethod
    def forward(ctx, x64: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
        y = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
        ctx.log = log
        ctx.save_for_backward(y.to(out_dtype).double())
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y_stored,) = ctx.saved_tensors
        grad = torch.ops.aten._log_softmax_backward_data if ctx.log else torch.ops.aten._softmax_backward_data
        return grad(dy, y_stored, -1, torch.float64), None, None


def softmax_reference(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Float64 softmax (``log``: log-softmax) over the last dim; differentiable (autograd gives the reference
    gradient). The result stays float64. Its gradient is aten's softmax backward applied to the output rounded
    to ``out_dtype``: the kernels' backward (and eager's, in bf16 or fp16) reads the stored ``y``, and a
    bf16 ``y`` carries a relative error of up to 2**-8 into ``dx`` that no kernel can avoid."""
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"softmax_reference: x must be a floating tensor of rank >= 1, got {x.dtype}, rank {x.dim()}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"softmax_reference: out_dtype must be floating point, got {out_dtype}")
    return _Float64Softmax.apply(x.double(), bool(log), out_dtype)
