"""Triton rotary position embedding (RoPE), forward and backward, for q and k in one launch.

The rotated part of a head (its first ``R`` = rotary_dim columns) is cut into ``R / 2`` pairs ``(x1, x2)``;
``c1, c2`` and ``s1, s2`` are cos and sin at the pair's two columns. Everything in float32::

    forward   y1 = x1 * c1 - x2 * s1          (HF: y = x * cos + rotate_half(x) * sin)
              y2 = x2 * c2 + x1 * s2
    backward  dx1 = dy1 * c1 + dy2 * s2       (the transposed map: the inverse rotation, as c1 = c2 and
              dx2 = dy2 * c2 - dy1 * s1        s1 = s2 in every model; nothing here assumes it)

Columns ``R .. D-1`` pass through unchanged (partial rotary, GPT-NeoX). Pairs:

- layout ``half`` (HF ``rotate_half``: ``cat(-x2, x1)``): ``(x[j], x[j + R/2])``;
- layout ``interleaved`` (GPT-J ``rotate_every_two``: ``stack(-x[1::2], x[::2]).flatten(-2)``): ``(x[2j], x[2j+1])``;
- layout ``complex`` (Meta Llama ``view_as_complex(x) * freqs_cis``): the pairs of ``interleaved``, with one
  cos/sin value per pair (``c1 = c2 = cos[j]``: cos, sin are the real and imaginary parts of ``freqs_cis``);
- layout ``deinterleave`` (DeepSeek V2/V3 ``rope_interleave``: ``cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)``
  with ``x1, x2 = x[..., 0::2], x[..., 1::2]``): the pairs read as ``interleaved`` and written as ``half``
  (``(y[j], y[j + R/2])``; the backward reads halves and writes interleaved pairs), one cos/sin value per pair;
- layout ``half_pairs`` (GPT-OSS: the same ``cat`` with ``x1, x2 = x.chunk(2, -1)``): the pairs of ``half``, one
  cos/sin value per pair.

cos and sin are read as given, through strides: broadcast dims (``unsqueeze(1)`` over heads, one table
for every batch row) have stride 0, and any position ids are already gathered into them. cos/sin need no
gradient here (the ops compute theirs with torch when a model trains them).

Addressing: every operand is viewed as 4-D ``[B, M, N, D]`` with unit stride along ``D`` and free strides
elsewhere (q and k are usually ``view(B, S, H, D).transpose(1, 2)``: read in place). ``M`` is the dim the
heads run along (``H`` of ``[B, H, S, D]``; k may have fewer, GQA). One program serves ``BLOCK_H`` heads of
one ``(b, n)`` position, of q or of k (grid ``(B * N, q head blocks + k head blocks)``), and loads cos/sin
once for them when they are the same for every head.

DRAM traffic is the floor: read q, k, cos, sin once, write the two outputs (the backward: read dq, dk, cos,
sin, write the two gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from autokernel.lowering.launch import KernelConfig, next_power_of_2

LAYOUTS = ("half", "interleaved", "complex", "deinterleave", "half_pairs")
# The kernel's INTERLEAVED: where a pair's two columns are, 0 (j, j + R/2) or 1 (2j, 2j + 1) in input and output
# alike, or 2: read at (2j, 2j + 1), written at (j, j + R/2) (the backward: the other way round).
PAIR_CODE = {"half": 0, "interleaved": 1, "complex": 1, "deinterleave": 2, "half_pairs": 0}
CS_PER_PAIR = ("complex", "deinterleave", "half_pairs")  # layouts with one cos/sin value per pair (R / 2 columns)
# Layouts a model writes as cat((x1 * c - x2 * s, x2 * c + x1 * s), -1) of its pairs' columns (:func:`pairs_as_halves`)
HALVES_OF_PAIRS = ("deinterleave", "half_pairs")
MAX_BLOCK_H = 256

# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_tile(X, Y, COS, SIN, x_base, x_sm, o_base, o_sm, c_base, c_sm, c_sd, s_base, s_sm, s_sd,
               h0, heads, half, rot_dim, head_dim,
               INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, CS_PER_HEAD: tl.constexpr, CS_PAIRS: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_REST: tl.constexpr):
    """Heads ``[h0, h0 + BLOCK_H)`` of one position: rotate their ``half`` pairs, copy the rest."""
    h = h0 + tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_P)[None, :]
    hmask = h < heads
    pmask = j < half
    mask = hmask & pmask
    # e1, e2: the pair's columns in x; o1, o2: in the output.
    if INTERLEAVED == 1:
        e1 = 2 * j
        e2 = e1 + 1
        o1 = e1
        o2 = e2
    elif INTERLEAVED == 2:
        if BACKWARD:
            e1 = j
            e2 = j + half
            o1 = 2 * j
            o2 = o1 + 1
        else:
            e1 = 2 * j
            e2 = e1 + 1
            o1 = j
            o2 = j + half
    else:
        e1 = j
        e2 = j + half
        o1 = e1
        o2 = e2
    # 64-bit head offsets: a head stride times the head index passes 2**31 on long sequences.
    xh = X + x_base + h.to(tl.int64) * x_sm
    oh = Y + o_base + h.to(tl.int64) * o_sm
    x1 = tl.load(xh + e1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xh + e2, mask=mask, other=0.0).to(tl.float32)
    if CS_PER_HEAD:
        ch = COS + c_base + h.to(tl.int64) * c_sm
        sh = SIN + s_base + h.to(tl.int64) * s_sm
        cmask = mask
    else:
        # The same cos/sin row for every head: one [1, BLOCK_P] load, broadcast over the heads.
        ch = COS + c_base
        sh = SIN + s_base
        cmask = pmask
    if CS_PAIRS:
        # One value per pair (the complex form, DeepSeek's, GPT-OSS's): the same cos/sin for both columns.
        c1 = tl.load(ch + j * c_sd, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(sh + j * s_sd, mask=cmask, other=0.0).to(tl.float32)
        c2 = c1
        s2 = s1
    else:
        c1 = tl.load(ch + e1 * c_sd, mask=cmask, other=0.0).to(tl.float32)
        c2 = tl.load(ch + e2 * c_sd, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(sh + e1 * s_sd, mask=cmask, other=0.0).to(tl.float32)
        s2 = tl.load(sh + e2 * s_sd, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(oh + o1, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(oh + o2, y2.to(Y.dtype.element_ty), mask=mask)
    if BLOCK_REST > 0:
        r = rot_dim + tl.arange(0, BLOCK_REST)[None, :]
        rmask = hmask & (r < head_dim)
        v = tl.load(xh + r, mask=rmask, other=0.0)
        tl.store(oh + r, v.to(Y.dtype.element_ty), mask=rmask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    q_sb, q_sm, q_sn, k_sb, k_sm, k_sn,
    qo_sb, qo_sm, qo_sn, ko_sb, ko_sm, ko_sn,
    c_sb, c_sm, c_sn, c_sd, s_sb, s_sm, s_sn, s_sd,
    n_size, q_heads, k_heads, q_blocks, half, rot_dim, head_dim,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, HAS_K: tl.constexpr, CS_PER_HEAD: tl.constexpr,
    CS_PAIRS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    """Program ``(b * n_size + n, hb)``: head block ``hb`` of q (``hb < q_blocks``), else block
    ``hb - q_blocks`` of k, at position ``(b, n)``. The backward is the same kernel with ``BACKWARD``
    (q, k are then the outputs' gradients, QO, KO the inputs')."""
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    b = (pid // n_size).to(tl.int64)
    n = (pid % n_size).to(tl.int64)
    c_base = b * c_sb + n * c_sn
    s_base = b * s_sb + n * s_sn
    # Each branch calls the tile with its own operands (no pointers merged across branches).
    if HAS_K:
        if hb >= q_blocks:
            _rope_tile(K, KO, COS, SIN, b * k_sb + n * k_sn, k_sm, b * ko_sb + n * ko_sn, ko_sm,
                       c_base, c_sm, c_sd, s_base, s_sm, s_sd, (hb - q_blocks) * BLOCK_H, k_heads, half, rot_dim,
                       head_dim, INTERLEAVED, BACKWARD, CS_PER_HEAD, CS_PAIRS, BLOCK_H, BLOCK_P, BLOCK_REST)
        else:
            _rope_tile(Q, QO, COS, SIN, b * q_sb + n * q_sn, q_sm, b * qo_sb + n * qo_sn, qo_sm,
                       c_base, c_sm, c_sd, s_base, s_sm, s_sd, hb * BLOCK_H, q_heads, half, rot_dim,
                       head_dim, INTERLEAVED, BACKWARD, CS_PER_HEAD, CS_PAIRS, BLOCK_H, BLOCK_P, BLOCK_REST)
    else:
        _rope_tile(Q, QO, COS, SIN, b * q_sb + n * q_sn, q_sm, b * qo_sb + n * qo_sn, qo_sm,
                   c_base, c_sm, c_sd, s_base, s_sm, s_sd, hb * BLOCK_H, q_heads, half, rot_dim,
                   head_dim, INTERLEAVED, BACKWARD, CS_PER_HEAD, CS_PAIRS, BLOCK_H, BLOCK_P, BLOCK_REST)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


class SourceKernels(NamedTuple):
    """A kernel a cache entry brings as source text (written by the tuning agent), in place of the built-in
    one. The contract is the built-in kernel's parameter list and grid: ``rope_kernel(Q, K, QO, KO, COS, SIN,
    q_sb, q_sm, q_sn, k_sb, k_sm, k_sn, qo_sb, qo_sm, qo_sn, ko_sb, ko_sm, ko_sn, c_sb, c_sm, c_sn, c_sd,
    s_sb, s_sm, s_sn, s_sd, n_size, q_heads, k_heads, q_blocks, half, rot_dim, head_dim, INTERLEAVED,
    BACKWARD, HAS_K, CS_PER_HEAD, CS_PAIRS, BLOCK_H, BLOCK_P, BLOCK_REST)``, grid ``(B * N, q_blocks + k_blocks)``
    with ``BLOCK_H`` heads per program; the same kernel serves the backward (``BACKWARD``). ``INTERLEAVED`` is
    :data:`PAIR_CODE` of the layout (0, 1 or 2), ``CS_PAIRS`` whether cos/sin hold one value per pair."""

    kernel: Any


@dataclass(frozen=True)
class RopeConfig(KernelConfig):
    """Launch parameters per pass: heads per program (``*_block_h``, a power of two; shrunk at launch to
    the heads there are) and warps."""

    fwd_block_h: int = 8
    fwd_num_warps: int = 4
    bwd_block_h: int = 8
    bwd_num_warps: int = 4

    def __post_init__(self) -> None:
        self._check_common(("fwd_num_warps", "bwd_num_warps"))
        for name in ("fwd_block_h", "bwd_block_h"):
            v = getattr(self, name)
            if v < 1 or v > MAX_BLOCK_H or v & (v - 1):
                raise ValueError(f"RopeConfig.{name} must be a power of two in [1, {MAX_BLOCK_H}], got {v}")


def default_config(hidden: int, rows: int, dtype: torch.dtype) -> RopeConfig:
    """A heuristic starting point: about 1024 rotated columns per program (``block_h`` heads of ``hidden``
    columns), 4 warps. ``rows`` and ``dtype`` are accepted so that a tuned table can key on them."""
    del rows, dtype
    block_h = max(1, min(MAX_BLOCK_H, 1024 // next_power_of_2(max(hidden, 1))))
    return RopeConfig(fwd_block_h=block_h, bwd_block_h=block_h)


# --------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    """How the operands are viewed for the kernel: padded to 4-D at the front, then dims 1 and 2 swapped
    when the heads run along dim 2 (``[B, S, H, D]``)."""

    pad: int
    swap: bool


def geometry(q_shape: tuple[int, ...], k_shape: tuple[int, ...] | None, cs_shape: tuple[int, ...]) -> Geometry:
    """Where the heads are: the dim where q and k differ (GQA), else the one cos/sin are broadcast over.
    Plain ints (the matcher passes size hints): this picks a grid, never a result."""
    pad = 4 - len(q_shape)
    q4 = (1,) * pad + tuple(q_shape)
    c4 = (1,) * (4 - len(cs_shape)) + tuple(cs_shape)
    if k_shape is not None:
        k4 = (1,) * pad + tuple(k_shape)
        if k4[2] != q4[2]:
            return Geometry(pad, True)
        if k4[1] != q4[1]:
            return Geometry(pad, False)
    return Geometry(pad, c4[1] != 1 and c4[2] == 1)


def _view4(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    t = t[(None,) * (4 - t.dim())] if t.dim() < 4 else t
    return t.transpose(1, 2) if g.swap else t


def _cs_strides(t: torch.Tensor, q4: torch.Tensor, k4: torch.Tensor | None, g: Geometry, what: str) -> list[int]:
    """cos's (or sin's) strides over q's 4-D view, 0 along broadcast dims, checked against q and k."""
    t4 = _view4(t, g)
    strides = []
    for i in range(3):
        size = t4.shape[i]
        for x in (q4, k4):
            if x is not None and size not in (1, x.shape[i]):
                raise ValueError(f"rope: {what} of shape {tuple(t.shape)} does not broadcast to "
                                 f"{tuple(x.shape)} (as [B, M, N, D])")
        strides.append(0 if size == 1 else t4.stride(i))
    return [*strides, t4.stride(3)]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def dim_order(x: torch.Tensor) -> list[int]:
    """``x``'s dims, outermost first (larger stride outer, as ``torch.empty_like`` keeps them; ties keep the dims'
    order), or the plain order where that would not keep the last dim innermost (the kernel's one assumption). q as
    models pass it is a transposed ``[B, S, H, D]`` view: outputs and gradients written in that order need no copy
    where the model reads them (the gradient, reshaped to ``[B, S, H * D]`` for the projection's matmul). Plain
    arithmetic on strides: real, fake and symbolic tensors get the same answer."""
    strides = list(x.stride())
    order = sorted(range(x.dim()), key=lambda i: -strides[i])
    return order if not order or order[-1] == x.dim() - 1 else list(range(x.dim()))


def empty_in_order(shape: Sequence[int], order: Sequence[int], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """A new dense tensor of ``shape`` laid out in ``order`` (outermost dim first): ``torch.empty`` of the dims in
    that order, permuted back. Not ``torch.empty_strided``: AOTAutograd's CSE merges equal ``empty_strided`` calls
    (it spares only ``aten.empty``), so the backward's gradient buffer became the forward's output buffer, saved
    for the backward, and Inductor copied it before each kernel wrote it, a full copy of q and of k in each pass
    (the H100 profile of ``benchmarks/profile_rope_context.py``)."""
    base = torch.empty([shape[i] for i in order], dtype=dtype, device=device)
    return base.permute(sorted(range(len(order)), key=order.__getitem__))


def _check(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
           rotary_dim: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"rope: layout must be one of {LAYOUTS}, got {layout!r}")
    if not 2 <= q.dim() <= 4:
        raise ValueError(f"rope: q must have 2 to 4 dims, got shape {tuple(q.shape)}")
    d = q.shape[-1]
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rope: rotary_dim must be even and in [2, {d}], got {rotary_dim}")
    if k is not None:
        if k.dim() != q.dim() or k.shape[-1] != d or k.dtype != q.dtype:
            raise ValueError(f"rope: k {tuple(k.shape)} {k.dtype} does not pair with q {tuple(q.shape)} {q.dtype}")
    width = rotary_dim // 2 if layout in CS_PER_PAIR else rotary_dim
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() > q.dim() or t.shape[-1] != width:
            raise ValueError(f"rope: {name} of shape {tuple(t.shape)} for q {tuple(q.shape)} and rotary_dim "
                             f"{rotary_dim}")


@functools.lru_cache(maxsize=256)  # runs on every launch
def _blocks(block_h: int, q_heads: int, k_heads: int, rotary_dim: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H shrunk to the heads there are, BLOCK_P, BLOCK_REST)."""
    block_h = min(block_h, next_power_of_2(max(q_heads, k_heads, 1)))
    rest = head_dim - rotary_dim
    return block_h, next_power_of_2(rotary_dim // 2), next_power_of_2(rest) if rest > 0 else 0


def _launch(x_q: torch.Tensor, x_k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
            rotary_dim: int, out_dtype: torch.dtype, backward: bool, block_h: int, num_warps: int,
            kernels: SourceKernels | None, traceable: bool,
            out_orders: tuple[list[int], list[int] | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate ``x_q`` (and ``x_k``) into new tensors of ``out_dtype``, laid out in ``out_orders`` (q's, k's) or
    else as the inputs (:func:`dim_order`)."""
    _check(x_q, x_k, cos, sin, layout, rotary_dim)
    if out_orders is None:
        out_orders = (dim_order(x_q), dim_order(x_k) if x_k is not None else None)
    out_q = empty_in_order(x_q.shape, out_orders[0], out_dtype, x_q.device)
    out_k = empty_in_order(x_k.shape, out_orders[1], out_dtype, x_k.device) if x_k is not None else None
    g = geometry(tuple(x_q.shape), tuple(x_k.shape) if x_k is not None else None, tuple(cos.shape))
    q4, qo4 = _view4(_unit_last(x_q), g), _view4(out_q, g)
    k4 = _view4(_unit_last(x_k), g) if x_k is not None else None
    ko4 = _view4(out_k, g) if out_k is not None else None
    if k4 is not None and (k4.shape[0] != q4.shape[0] or k4.shape[2] != q4.shape[2]):
        raise ValueError(f"rope: q {tuple(x_q.shape)} and k {tuple(x_k.shape)} differ in more than the heads")
    c = _cs_strides(cos, q4, k4, g, "cos")
    s = _cs_strides(sin, q4, k4, g, "sin")
    cos4, sin4 = _view4(cos, g), _view4(sin, g)
    b, q_heads, n, d = q4.shape
    k_heads = k4.shape[1] if k4 is not None else 0
    if b * n == 0 or q_heads + k_heads == 0:
        return out_q, out_k
    bh, bp, brest = _blocks(block_h, q_heads, k_heads, rotary_dim, d)
    q_blocks = triton.cdiv(q_heads, bh)
    grid = (b * n, q_blocks + triton.cdiv(k_heads, bh))
    kernel = kernels.kernel if kernels is not None else _rope_kernel
    if traceable:
        kernel = wrap_triton(kernel)
    # Without k, q stands in for both of k's operands: HAS_K compiles every access to them away, and an input
    # (never an output passed twice) is what wrap_triton then sees.
    kk, kko = (k4, ko4) if k4 is not None else (q4, q4)
    kernel[grid](
        q4, kk, qo4, kko, cos4, sin4,
        q4.stride(0), q4.stride(1), q4.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        qo4.stride(0), qo4.stride(1), qo4.stride(2), kko.stride(0), kko.stride(1), kko.stride(2),
        *c, *s,
        n, q_heads, k_heads, q_blocks, rotary_dim // 2, rotary_dim, d,
        INTERLEAVED=PAIR_CODE[layout], BACKWARD=backward, HAS_K=k4 is not None,
        CS_PER_HEAD=c[1] != 0 or s[1] != 0, CS_PAIRS=layout in CS_PER_PAIR, BLOCK_H=bh, BLOCK_P=bp,
        BLOCK_REST=brest, num_warps=num_warps,
    )
    return out_q, out_k


def rope_fwd(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
             rotary_dim: int, out_dtype: torch.dtype, config: RopeConfig, kernels: SourceKernels | None = None,
             traceable: bool = False,
             out_orders: tuple[list[int], list[int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q * cos + rotate(q) * sin, same for k)`` over the first ``rotary_dim`` columns, the rest copied.

    ``q``, ``k``: ``[..., D]`` of 2 to 4 dims with unit stride along D (else copied), k of q's dtype and of
    q's shape but for the heads dim (GQA); ``k`` may be None. ``cos``, ``sin``: ``[..., rotary_dim]``,
    broadcastable to q and k. Returns tensors of ``out_dtype`` laid out in ``out_orders`` (q's, k's; each
    outermost dim first), else in q's and k's own layouts (:func:`dim_order`); None for a missing k.
    ``kernels``: a cache entry's kernel instead of the built-in one. ``traceable``: launch through
    ``wrap_triton`` (from a ``triton_op``), so that Inductor launches the kernel itself."""
    return _launch(q, k, cos, sin, layout, rotary_dim, out_dtype, False, config.fwd_block_h, config.fwd_num_warps,
                   kernels, traceable, out_orders)


def rope_bwd(dq: torch.Tensor, dk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
             rotary_dim: int, in_dtype: torch.dtype, config: RopeConfig, kernels: SourceKernels | None = None,
             traceable: bool = False,
             out_orders: tuple[list[int], list[int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of q and k from those of :func:`rope_fwd`'s outputs (the transposed rotation), of ``in_dtype``
    (q's dtype), laid out in ``out_orders`` (q's and k's :func:`dim_order`, so that each gradient has its input's
    layout) or else as ``dq`` and ``dk``. Arguments as there."""
    if dk is not None and dk.dtype != dq.dtype:
        dk = dk.to(dq.dtype)
    return _launch(dq, dk, cos, sin, layout, rotary_dim, in_dtype, True, config.bwd_block_h, config.bwd_num_warps,
                   kernels, traceable, out_orders)


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The partner of every column, signed: HF ``rotate_half`` or GPT-J ``rotate_every_two`` (also the complex
    form's: ``i * x`` on the pairs). Not for :data:`HALVES_OF_PAIRS` (:func:`pairs_as_halves`)."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if layout in ("interleaved", "complex"):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    raise ValueError(f"rope: rotate takes the layouts half, interleaved and complex, got {layout!r}")


def pairs_as_halves(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with each pair's first column in the first half and its second in the second, for a layout of
    :data:`HALVES_OF_PAIRS`: ``deinterleave`` permutes its interleaved pairs (``cat((x[..., 0::2], x[..., 1::2]),
    -1)``), ``half_pairs`` has them so already. Both are then the ``half`` rotation with each pair's cos/sin
    repeated over both halves."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1) if layout == "deinterleave" else x


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int) -> torch.Tensor:
    """RoPE as a model writes it, in the tensors' own dtypes (what the kernels replace); differentiable. For
    the complex layout, cos/sin hold one value per pair (``freqs_cis.real``, ``.imag``)."""
    return rope_apply_all((x,), cos, sin, layout, rotary_dim)[0]


def rope_apply_all(xs: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, layout: str,
                   rotary_dim: int) -> list[torch.Tensor]:
    """:func:`rope_apply` of each of ``xs`` (q and k), every rotated part sliced before any is rotated, as HF's
    ``apply_rotary_pos_emb`` does: the matcher pairs q with k only where both inputs exist before either
    output (the one fused op stands where the first output was)."""
    if layout == "complex":
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    parts = [(x[..., :rotary_dim], x[..., rotary_dim:]) for x in xs]
    out = []
    for rot, rest in parts:
        if layout in HALVES_OF_PAIRS:  # spelled as DeepSeek and GPT-OSS write it: the tuner races this in context
            x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if layout == "deinterleave" else rot.chunk(2, dim=-1)
            y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            y = rot * cos + rotate(rot, layout) * sin
        out.append(torch.cat((y, rest.to(y.dtype)), dim=-1) if rest.shape[-1] else y)
    return out


def rope_reference(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
                   rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 :func:`rope_apply` of q and k (no intermediate rounding: the kernels keep float32);
    differentiable, so autograd gives the reference grads."""
    c, s = cos.double(), sin.double()
    return (rope_apply(q.double(), c, s, layout, rotary_dim),
            rope_apply(k.double(), c, s, layout, rotary_dim) if k is not None else None)
