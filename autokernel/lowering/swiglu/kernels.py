"""Triton gated-MLP activation, forward and backward: ``y = act(gate) * up``.

Elementwise, everything computed in float32 inside the kernels, the activation recomputed in the
backward (never saved)::

    silu:       a = g * s,                 s = sigmoid(g)
                a' = s * (1 + g * (1 - s))
    gelu:       a = g * P,                 P = 0.5 * (1 + erf(g / sqrt(2)))     (the normal CDF)
                a' = P + g * exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh:  a = g * q,                 q = sigmoid(2 z),  z = sqrt(2 / pi) * (g + 0.044715 g^3)
                a' = q + 2 g q (1 - q) * sqrt(2 / pi) * (1 + 3 * 0.044715 g^2)

``0.5 * (1 + tanh(z)) == sigmoid(2 z)``: the tanh form is written with a sigmoid, which needs no
libdevice call (its name moved between Triton versions) and loses nothing to ``1 + tanh`` cancelling
for large negative ``g``.

Backward, given ``dy``::

    dup   = dy * a
    dgate = dy * up * a'

DRAM traffic is the floor: the forward reads ``gate`` and ``up`` once and writes ``y``; the backward reads
``gate``, ``up`` and ``dy`` once and writes ``dgate`` and ``dup``.

Layouts: ``gate`` and ``up`` are two tensors, or the two halves of the last dim of one tensor ``x``
(``gate, up = x.chunk(2, dim=-1)``, or with the halves swapped). The kernels address every operand as
rows of ``n_cols`` columns with a row stride and a column offset, so the halves are read in place, and the
backward writes ``dgate`` and ``dup`` into the two halves of one ``dx`` (no concatenation afterwards).
Contiguous operands of the two-tensor layout are viewed as one long row. The grid is one program per
``BLOCK_N`` columns of one row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import KernelConfig

ACTS = ("silu", "gelu", "gelu_tanh")
LAYOUTS = ("separate", "gate_up", "up_gate")  # two tensors; one tensor, gate first; one tensor, up first
_ACT_CODE = {name: i for i, name in enumerate(ACTS)}
MAX_BLOCK = 65536

# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, GRAD: tl.constexpr):
    """(a, a') of the activation ``ACT`` (0 silu, 1 gelu, 2 gelu_tanh) at float32 ``g``; a' only with GRAD."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        if GRAD:
            da = s * (1.0 + g * (1.0 - s))
        else:
            da = a
    elif ACT == 1:
        p = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * p
        if GRAD:
            # 0.3989... = 1 / sqrt(2 pi)
            da = p + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            da = a
    else:
        # 0.7978... = sqrt(2 / pi)
        q = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        a = g * q
        if GRAD:
            da = q + 2.0 * g * q * (1.0 - q) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            da = a
    return a, da


@triton.jit
def _swiglu_fwd_kernel(
    G,
    U,
    Y,
    stride_g,
    stride_u,
    stride_y,
    g_off,
    u_off,
    n_cols,
    col_blocks,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program ``pid = r * col_blocks + c`` computes columns ``[c * BLOCK_N, (c + 1) * BLOCK_N)`` of row ``r``."""
    pid = tl.program_id(0)
    row = pid // col_blocks
    start = tl.cast(pid - row * col_blocks, tl.int64) * BLOCK_N
    # 64-bit scalar bases (rows * stride passes 2**31 on large activations), 32-bit vector offsets.
    row64 = tl.cast(row, tl.int64)
    cols = tl.arange(0, BLOCK_N)
    # A scalar bound: with n_cols a multiple of 16 the compiler proves the mask constant over 16-byte groups
    # and keeps the loads and stores vectorized.
    mask = cols < n_cols - start
    g = tl.load(G + (row64 * stride_g + g_off + start) + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + (row64 * stride_u + u_off + start) + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(Y + (row64 * stride_y + start) + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,
    G,
    U,
    DG,
    DU,
    stride_dy,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    g_off,
    u_off,
    n_cols,
    col_blocks,
    ACT: tl.constexpr,
    ONE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Same grid as the forward. ``ONE_GRAD``: ``dgate`` and ``dup`` are the halves of one buffer ``DG``
    (at column offsets ``g_off`` and ``u_off``, as the inputs), and ``DU`` is not touched."""
    pid = tl.program_id(0)
    row = pid // col_blocks
    start = tl.cast(pid - row * col_blocks, tl.int64) * BLOCK_N
    row64 = tl.cast(row, tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols - start
    dy = tl.load(DY + (row64 * stride_dy + start) + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + (row64 * stride_g + g_off + start) + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + (row64 * stride_u + u_off + start) + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    dgate = dy * u * da
    dup = dy * a
    if ONE_GRAD:
        tl.store(DG + (row64 * stride_dg + g_off + start) + cols, dgate.to(DG.dtype.element_ty), mask=mask)
        tl.store(DG + (row64 * stride_dg + u_off + start) + cols, dup.to(DG.dtype.element_ty), mask=mask)
    else:
        tl.store(DG + (row64 * stride_dg + start) + cols, dgate.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + (row64 * stride_du + start) + cols, dup.to(DU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


class SourceKernels(NamedTuple):
    """Kernels a cache entry brings as source text (written by the tuning agent), in place of the built-in
    pair. The contract is the built-in kernels' parameter lists and grid: ``fwd(G, U, Y, stride_g, stride_u,
    stride_y, g_off, u_off, n_cols, col_blocks, ACT, BLOCK_N)`` and ``bwd(DY, G, U, DG, DU, stride_dy,
    stride_g, stride_u, stride_dg, stride_du, g_off, u_off, n_cols, col_blocks, ACT, ONE_GRAD, BLOCK_N)``,
    one program per ``BLOCK_N`` columns of a row (``pid = row * col_blocks + column block``); ACT 0 silu,
    1 gelu (erf), 2 gelu tanh."""

    fwd: Any
    bwd: Any


@dataclass(frozen=True)
class SwigluConfig(KernelConfig):
    """Launch parameters: columns per program (``*_block``, a power of two) and warps, per pass."""

    fwd_block: int = 2048
    fwd_num_warps: int = 4
    bwd_block: int = 2048
    bwd_num_warps: int = 8

    def __post_init__(self) -> None:
        self._check_common(("fwd_num_warps", "bwd_num_warps"))
        for name in ("fwd_block", "bwd_block"):
            v = getattr(self, name)
            if v < 16 or v > MAX_BLOCK or v & (v - 1):
                raise ValueError(f"SwigluConfig.{name} must be a power of two in [16, {MAX_BLOCK}], got {v}")



def default_config(hidden: int, rows: int, dtype: torch.dtype) -> SwigluConfig:
    """A heuristic starting point: 16 elements per thread in the forward (two 16-byte loads of each bf16
    input in flight), 8 in the backward (three inputs, two outputs). ``hidden``, ``rows`` and ``dtype``
    are accepted so that a tuned table can key on them; the heuristic does not need them."""
    del hidden, rows, dtype
    return SwigluConfig()


@functools.lru_cache(maxsize=256)  # runs on every launch
def _launch_shape(block: int, warps: int, n_cols: int) -> tuple[int, int]:
    """The configured block, shrunk for narrow rows (fewer masked lanes), and warps to match it."""
    block = min(block, max(16, 1 << max(n_cols - 1, 0).bit_length()))
    return block, max(1, min(warps, block // 32))


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as ``[rows, width]`` with unit column stride (the row stride is free; a copy only if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    # Rows spelled out: reshape(-1, 0) cannot infer them.
    return t.reshape(math.prod(t.shape[:-1]) if t.shape[-1] == width else t.numel() // width, width)


def _row_stride(t: torch.Tensor) -> int:
    """A 2-D operand's row stride; 0 for one row, where it is never used: an odd stride (a single long row of
    odd length) would keep the compiler from proving 16-byte alignment and cost the vectorized accesses."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _operands(x: torch.Tensor, up: torch.Tensor | None,
              layout: str) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
    """(width of a half or of gate, gate rows, up rows, gate column offset, up column offset)."""
    if layout not in LAYOUTS:
        raise ValueError(f"swiglu: layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dim() < 1:
        raise ValueError("swiglu: gate (or the fused gate/up tensor) must have at least one dimension")
    if layout == "separate":
        if up is None:
            raise ValueError("swiglu: layout 'separate' needs up")
        if tuple(up.shape) != tuple(x.shape):
            raise ValueError(f"swiglu: gate shape {tuple(x.shape)} != up shape {tuple(up.shape)}")
        if up.dtype != x.dtype:
            raise ValueError(f"swiglu: gate dtype {x.dtype} != up dtype {up.dtype}")
        width = x.shape[-1]
        if x.is_contiguous() and up.is_contiguous():
            # Both plain: one long row, so every program but the last has full blocks.
            return x.numel(), x.reshape(1, -1), up.reshape(1, -1), 0, 0
        return width, _rows(x, width), _rows(up, width), 0, 0
    if up is not None:
        raise ValueError(f"swiglu: layout {layout!r} takes one tensor, got up too")
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: layout {layout!r} needs an even last dim, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    x2 = _rows(x, x.shape[-1])
    return (half, x2, x2, 0, half) if layout == "gate_up" else (half, x2, x2, half, 0)


def _check_act(act: str) -> int:
    if act not in _ACT_CODE:
        raise ValueError(f"swiglu: act must be one of {ACTS}, got {act!r}")
    return _ACT_CODE[act]


def swiglu_fwd(
    x: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    layout: str,
    config: SwigluConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """``act(gate) * up``. ``layout`` "separate": ``x`` is gate, ``up`` its partner of the same shape and
    dtype; "gate_up" / "up_gate": ``x`` holds both as the halves of its last dim and ``up`` is None.
    Returns ``y`` (gate's shape, contiguous, x's dtype). ``kernels``: a cache entry's kernels instead of the
    built-in ones (see :class:`SourceKernels`). ``traceable``: launch through ``wrap_triton`` (from a
    ``triton_op``), so that Inductor launches the kernel itself."""
    code = _check_act(act)
    width, g2, u2, g_off, u_off = _operands(x, up, layout)
    out_shape = x.shape if layout == "separate" else (*x.shape[:-1], x.shape[-1] // 2)
    rows = g2.shape[0]
    y = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return y.view(out_shape)
    block, warps = _launch_shape(config.fwd_block, config.fwd_num_warps, width)
    col_blocks = triton.cdiv(width, block)
    kernel = kernels.fwd if kernels is not None else _swiglu_fwd_kernel
    if traceable:
        kernel = wrap_triton(kernel)
    kernel[(rows * col_blocks,)](
        g2, u2, y, _row_stride(g2), _row_stride(u2), _row_stride(y), g_off, u_off, width, col_blocks,
        ACT=code, BLOCK_N=block, num_warps=warps,
    )
    return y.view(out_shape)


def swiglu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    layout: str,
    config: SwigluConfig,
    kernels: SourceKernels | None = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`swiglu_fwd` (arguments as there). Returns ``(dgate, dup)`` for the "separate"
    layout, else ``(dx, None)`` with both halves' gradients in the one ``dx`` (x's shape). Contiguous,
    x's dtype."""
    code = _check_act(act)
    width, g2, u2, g_off, u_off = _operands(x, up, layout)
    one_grad = layout != "separate"
    gate_shape = x.shape if not one_grad else (*x.shape[:-1], x.shape[-1] // 2)
    if tuple(dy.shape) != tuple(gate_shape):
        raise ValueError(f"swiglu_bwd: dy shape {tuple(dy.shape)} != output shape {tuple(gate_shape)}")
    rows = g2.shape[0]
    dg = torch.empty(g2.shape if not one_grad else (rows, 2 * width), dtype=x.dtype, device=x.device)
    du = torch.empty_like(dg) if not one_grad else None
    if rows and width:
        dy2 = _rows(dy, width)  # one long row too when gate and up are (width is then their numel)
        block, warps = _launch_shape(config.bwd_block, config.bwd_num_warps, width)
        col_blocks = triton.cdiv(width, block)
        kernel = kernels.bwd if kernels is not None else _swiglu_bwd_kernel
        if traceable:
            kernel = wrap_triton(kernel)
        # With ONE_GRAD, DU is never touched: dy stands in (a read-only tensor, so that under wrap_triton no
        # output is passed twice).
        du_arg = du if du is not None else dy2
        kernel[(rows * col_blocks,)](
            dy2, g2, u2, dg, du_arg,
            _row_stride(dy2), _row_stride(g2), _row_stride(u2), _row_stride(dg), _row_stride(du_arg),
            g_off, u_off, width, col_blocks,
            ACT=code, ONE_GRAD=one_grad, BLOCK_N=block, num_warps=warps,
        )
    if one_grad:
        return dg.view(x.shape), None
    return dg.view(x.shape), du.view(x.shape)


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def swiglu_reference(x: torch.Tensor, up: torch.Tensor | None, act: str, layout: str) -> torch.Tensor:
    """Float64 ``act(gate) * up`` with the kernels' layouts; differentiable (autograd gives the reference
    grads). No intermediate rounding: the kernels keep ``act(gate)`` in float32."""
    _check_act(act)
    if layout == "separate":
        if up is None:
            raise ValueError("swiglu_reference: layout 'separate' needs up")
        gate, up64 = x.double(), up.double()
    elif layout in ("gate_up", "up_gate"):
        first, second = x.double().chunk(2, dim=-1)
        gate, up64 = (first, second) if layout == "gate_up" else (second, first)
    else:
        raise ValueError(f"swiglu_reference: layout must be one of {LAYOUTS}, got {layout!r}")
    if act == "silu":
        a = torch.nn.functional.silu(gate)
    else:
        a = torch.nn.functional.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")
    return a * up64
