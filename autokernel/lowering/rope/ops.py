"""Rotary position embedding as ``torch.ops.autokernel`` custom ops: forward-only op, training op, backward.

``(q_out, k_out) = (q * cos + rotate(q) * sin, k * cos + rotate(k) * sin)`` over the first ``rotary_dim``
columns of each head, the others passed through (see :mod:`autokernel.lowering.rope.kernels`). ``k`` may be
None (a tensor rotated alone); the op then returns an empty second output. With layout ``complex`` the op
takes ``freqs_cis`` (complex) as both cos and sin: ``view_as_real(x) * freqs_cis``, its real and imaginary
parts read in place.

The ops are functional (no input mutation, outputs never alias inputs; an in-place RoPE becomes this op)
and pick their kernel configuration at run time from the actual shape, through the in-memory table of the
disk cache. The training op saves only cos and sin: the backward is the transposed rotation of the
outputs' gradients and never reads q or k. When cos or sin require grad (a learned table), their gradient
is computed with torch ops in the autograd formula, which then also saves q and k::

    dcos = sum over broadcast dims of (dq_out * q + dk_out * k)            (rotated columns)
    dsin = sum over broadcast dims of (dq_out * rotate(q) + dk_out * rotate(k))

(For layouts ``half_pairs`` and ``deinterleave``, the latter with q, k first permuted to halves: each pair's two
columns summed, cos/sin having one value per pair.)
"""

from __future__ import annotations

import functools

import torch

from autokernel.cache import row_bucket, runtime
from autokernel.lowering.launch import cached_choice, define_plain_op, load_source_kernels, run_with_fallback
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.rope.kernels import (
    HALVES_OF_PAIRS,
    RopeConfig,
    SourceKernels,
    default_config,
    dim_order,
    empty_in_order,
    geometry,
    pairs_as_halves,
    rope_bwd,
    rope_fwd,
    rotate,
)

PATTERN = "rope"
KERNEL = "rope_kernel"  # the name a source entry defines


@functools.cache  # computed on every call of an opaque op; its arguments are few and hashable
def pattern_key(layout: str, rotary_dim: int, head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype,
                cs_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """The variant part of the cache key: everything but the shape that changes the kernel. ``heads`` and
    ``kv_heads`` are q's and k's heads (0 without k), which set the grid; ``rotary_dim`` shows only when
    partial."""
    rot = "full" if rotary_dim == head_dim else str(rotary_dim)
    return (f"{PATTERN}/layout={layout},rotary={rot},heads={heads},kv_heads={kv_heads},dtype={dtype_name(dtype)},"
            f"cs={dtype_name(cs_dtype)},out={dtype_name(out_dtype)}")


def source_kernels(root: str, source: str) -> SourceKernels:
    """The kernel a source text defines (loaded under ``root``); ValueError when it lacks it."""
    return SourceKernels(*load_source_kernels(root, source, (KERNEL,)))


def heads_of(q: torch.Tensor, k: torch.Tensor | None, cs: torch.Tensor) -> tuple[int, int]:
    """(q heads, k heads or 0): the sizes along the dim the kernel's grid puts the heads on."""
    g = geometry(tuple(q.shape), tuple(k.shape) if k is not None else None, tuple(cs.shape))
    dim = (2 if g.swap else 1) - g.pad
    if dim < 0:
        return 1, 1 if k is not None else 0
    return q.shape[dim], k.shape[dim] if k is not None else 0


def _variant(x, k, cos, layout, rotary_dim, in_dtype, out_dtype) -> tuple[str, int, int]:
    """(pattern key, hidden, rows) of a call on ``x`` (q, or its output's gradient): the cache's coordinates."""
    heads, kv_heads = heads_of(x, k, cos)
    hidden = x.shape[-1]
    key = pattern_key(layout, rotary_dim, hidden, heads, kv_heads, in_dtype, cos.dtype, out_dtype)
    return key, hidden, x.numel() // max(hidden, 1)


def select_config(x: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, layout: str, rotary_dim: int,
                  in_dtype: torch.dtype, out_dtype: torch.dtype,
                  cache_dir: str) -> tuple[tuple, tuple[RopeConfig, SourceKernels | None]]:
    """(memo key, (config, kernel)): the tuned configuration (and kernel, for a source entry) for this call's
    variant and shape, else the built-in heuristic. ``in_dtype``/``out_dtype``: q's and the outputs' dtypes
    (the forward's, in both passes: one cache entry serves both). Runs on every call: after the first per
    shape bucket, one dict read."""
    key, hidden, rows = _variant(x, k, cos, layout, rotary_dim, in_dtype, out_dtype)
    memo_key = (key, cache_dir, x.device, hidden, row_bucket(rows))
    chosen = runtime.memo.get(memo_key)
    if chosen is None:
        default = default_config(hidden, row_bucket(rows), in_dtype)
        chosen = runtime.memo[memo_key] = cached_choice(cache_dir, x.device, key, hidden, rows, RopeConfig,
                                                        source_kernels, default)
    return memo_key, chosen


def _run(x, k, cos, layout, rotary_dim, in_dtype, out_dtype, cache_dir, run):
    memo_key, chosen = select_config(x, k, cos, layout, rotary_dim, in_dtype, out_dtype, cache_dir)
    return run_with_fallback(chosen, run, "rope", x,
                             lambda: (memo_key, default_config(x.shape[-1], memo_key[-1], in_dtype)))


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The second output without k."""
    return like.new_empty((0,), dtype=dtype)


def _real_parts(cos: torch.Tensor, sin: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' cos and sin: for the complex layout, freqs_cis's real and imaginary parts (strided views)."""
    if layout == "complex" and cos.is_complex():
        parts = torch.view_as_real(cos)
        return parts[..., 0], parts[..., 1]
    return cos, sin


def output_order(x: torch.Tensor, keep_layout: bool) -> list[int]:
    """Where an output of the forward goes: ``x``'s own layout for a reader that takes any strides (SDPA's fused
    kernels), else contiguous (a matmul reads a transposed [B, S, H, D] q through a copy)."""
    return dim_order(x) if keep_layout else list(range(x.dim()))


def _forward(q, k, cos, sin, layout, rotary_dim, out_dtype, keep_q_layout, keep_k_layout, cache_dir,
             traceable: bool):
    c, s = _real_parts(cos, sin, layout)
    orders = (output_order(q, keep_q_layout), output_order(k, keep_k_layout) if k is not None else None)
    qo, ko = _run(q, k, cos, layout, rotary_dim, q.dtype, out_dtype, cache_dir, lambda config, kernels: rope_fwd(
        q, k, c, s, layout, rotary_dim, out_dtype, config, kernels, traceable, orders))
    return qo, ko if ko is not None else _empty(q, out_dtype)


def _backward(dq, dk, cos, sin, layout, rotary_dim, in_dtype, q_order, k_order, cache_dir, traceable: bool):
    c, s = _real_parts(cos, sin, layout)
    orders = (q_order, k_order if dk is not None else None)
    gq, gk = _run(dq, dk, cos, layout, rotary_dim, in_dtype, dq.dtype, cache_dir, lambda config, kernels: rope_bwd(
        dq, dk, c, s, layout, rotary_dim, in_dtype, config, kernels, traceable, orders))
    return gq, gk if gk is not None else _empty(dq, in_dtype)


def _like(x: torch.Tensor, order: list[int], dtype: torch.dtype) -> torch.Tensor:
    return empty_in_order(x.shape, order, dtype, x.device)


def _define_ops(suffix: str, inline: bool) -> None:
    """Define ``autokernel::rope{suffix}`` (forward only), ``rope_train{suffix}`` (differentiable) and
    ``rope_backward{suffix}``.

    Two flavours of the same ops, as for RMSNorm (see ``autokernel.lowering.rms_norm.ops``): opaque (``custom_op``
    or a plain ``Library`` op, configuration picked on every call; symbolic shapes, the interpreter) and inline
    (``triton_op``, traced through, so Inductor launches our kernel from its own code; static shapes)."""
    define = torch.library.triton_op if inline else torch.library.custom_op

    # One body for the forward-only op and the differentiable one: they differ in their registration (the
    # train op carries the autograd formula), not in what they compute.
    def rotate_q_k(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
                   rotary_dim: int, out_dtype: torch.dtype, keep_q_layout: bool, keep_k_layout: bool,
                   cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, cos, sin, layout, rotary_dim, out_dtype, keep_q_layout, keep_k_layout, cache_dir,
                        inline)

    def backward(dq: torch.Tensor, dk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, layout: str,
                 rotary_dim: int, in_dtype: torch.dtype, q_order: list[int], k_order: list[int],
                 cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(dq, dk, cos, sin, layout, rotary_dim, in_dtype, q_order, k_order, cache_dir, inline)

    def fake_forward(q, k, cos, sin, layout, rotary_dim, out_dtype, keep_q_layout, keep_k_layout, cache_dir):
        return (_like(q, output_order(q, keep_q_layout), out_dtype),
                _like(k, output_order(k, keep_k_layout), out_dtype) if k is not None else _empty(q, out_dtype))

    def fake_backward(dq, dk, cos, sin, layout, rotary_dim, in_dtype, q_order, k_order, cache_dir):
        return (_like(dq, q_order, in_dtype),
                _like(dk, k_order, in_dtype) if dk is not None else _empty(dq, in_dtype))

    define_plain_op(f"autokernel::rope{suffix}", rotate_q_k, inline=inline, fake=fake_forward)
    backward_op = define_plain_op(f"autokernel::rope_backward{suffix}", backward, inline=inline, fake=fake_backward)
    train_op = define(f"autokernel::rope_train{suffix}", rotate_q_k, mutates_args=())
    if not inline:  # a triton_op derives its fake from its body
        train_op.register_fake(fake_forward)

    def setup_context(ctx, inputs, output):
        q, k, cos, sin, layout, rotary_dim, _out_dtype, _keep_q_layout, _keep_k_layout, cache_dir = inputs
        ctx.cs_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        # q and k only for a trained cos/sin: the rotation's own backward never reads them.
        ctx.save_for_backward(cos, sin, *((q, k) if ctx.cs_grad else ()))
        ctx.has_k, ctx.in_dtype = k is not None, q.dtype
        # Each gradient in its input's layout (q as models pass it: a transposed [B, S, H, D] view), so the
        # projection's backward reads it without a copy.
        ctx.orders = (dim_order(q), dim_order(k) if k is not None else [])
        ctx.layout, ctx.rotary_dim, ctx.cache_dir = layout, rotary_dim, cache_dir

    def train_backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors[:2]
        dk_out = dk_out if ctx.has_k else None
        dq, dk = backward_op(dq_out, dk_out, cos, sin, ctx.layout, ctx.rotary_dim, ctx.in_dtype, *ctx.orders,
                             ctx.cache_dir)
        dcos = dsin = None
        if ctx.cs_grad:
            dcos, dsin = _cos_sin_grads(ctx.saved_tensors[2], ctx.saved_tensors[3], dq_out, dk_out, cos, sin,
                                        ctx.layout, ctx.rotary_dim)
        return dq, (dk if ctx.has_k else None), dcos, dsin, None, None, None, None, None, None

    train_op.register_autograd(train_backward, setup_context=setup_context)


def _cos_sin_grads(q, k, dq_out, dk_out, cos, sin, layout, rotary_dim):
    """Gradients of a trained cos/sin table, with torch ops (rare: not worth a kernel), in float32. A complex
    ``freqs_cis`` (passed as cos and as sin) gets ``sum(dy * conj(x))`` through its cos slot alone."""
    if layout == "complex" and cos.is_complex():
        dfreqs = None
        for x, dy in ((q, dq_out), (k, dk_out)):
            if x is not None:
                xc, gc = (torch.view_as_complex(t.float().contiguous().unflatten(-1, (-1, 2))) for t in (x, dy))
                d = (gc * xc.conj()).sum_to_size(cos.shape)
                dfreqs = d if dfreqs is None else dfreqs + d
        return dfreqs.to(cos.dtype), None
    dcos = dsin = None
    for x, dy in ((q, dq_out), (k, dk_out)):
        if x is None:
            continue
        xr, g = x[..., :rotary_dim].float(), dy[..., :rotary_dim].float()
        if layout in HALVES_OF_PAIRS:  # the half rotation (of the pairs as halves), one cos/sin a pair
            xr = pairs_as_halves(xr, layout)
            c, s = ((g * t).unflatten(-1, (2, -1)).sum(-2) for t in (xr, rotate(xr, "half")))
        else:
            c, s = g * xr, g * rotate(xr, layout)
        c, s = c.sum_to_size(cos.shape), s.sum_to_size(sin.shape)
        dcos, dsin = (c, s) if dcos is None else (dcos + c, dsin + s)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


_define_ops("", inline=False)
_define_ops("_inline", inline=True)
