"""Rotary position embedding (RoPE): spellings found and paired, hits rewritten and equal to float64 forward and
backward, declines with their reasons, the kernels against the float64 reference at awkward shapes, the ops
(opcheck, trained cos/sin), and ak-tune's miss -> tune -> hit.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes, and
few torch.compile calls (each costs seconds).
"""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from models import rope_entry

import autokernel
from autokernel.cache import KernelCache
from autokernel.lowering.rope.kernels import RopeConfig, dim_order, rope_bwd, rope_fwd, rope_reference, rotate
from autokernel.playbook.tolerances import assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rope  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope  # noqa: E402
from transformers.models.llama.modeling_llama import rotate_half  # noqa: E402

backend_module = importlib.import_module("autokernel.backend")  # ``autokernel.backend`` is the function

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {torch.ops.autokernel.rope.default, torch.ops.autokernel.rope_train.default}
# One head per program, one warp: the head-block grid and the q/k split are exercised on tiny shapes.
SMALL = RopeConfig(fwd_block_h=1, fwd_num_warps=1, bwd_block_h=2, bwd_num_warps=1)


def same_layout(out: torch.Tensor, x: torch.Tensor) -> bool:
    """``out`` is dense with ``x``'s dims in ``x``'s storage order (size-1 dims, whose place is moot, left out;
    plain order where ``x``'s last dim is not innermost: the kernel copies such an input)."""
    def sized(t: torch.Tensor) -> list[int]:
        return [d for d in dim_order(t) if t.shape[d] > 1]
    step = 1
    for d in reversed(sized(out)):
        if out.stride(d) != step:
            return False
        step *= out.shape[d]
    return sized(out) == sized(x)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def heads(b: int, s: int, h: int, d: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """q or k as HF makes them: ``view(B, S, H, D).transpose(1, 2)`` (a strided view), of a wider row if ``pad``."""
    return (torch.randn(b, s, h, d + pad, generator=_gen(seed)).to(dtype)[..., :d]).transpose(1, 2)


def cos_sin(b: int, s: int, r: int, dtype: torch.dtype, seed: int = 99, layout: str = "half"):
    """HF's cos/sin ``[B, S, R]`` at random position ids (duplicated halves, GPT-J's interleaved pairs, or one
    per pair: the complex form's ``freqs_cis`` parts)."""
    pos = torch.randint(0, 64, (b, s), generator=_gen(seed)).double()
    ang = pos[..., None] / 10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    emb = {"half": torch.cat((ang, ang), -1), "interleaved": ang.repeat_interleave(2, -1), "complex": ang,
           "deinterleave": ang, "half_pairs": ang}[layout]
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------- backend helpers


def explain(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return [i for i in report.instances if i.pattern == "rope"]


def make_hits(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    """A cache entry for every rope miss explain reports, then explain again."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in explain(fn, inputs, cache_dir):
            if inst.status != "miss":
                continue
            cache.put_entry(rope_entry(inst, SMALL.to_dict()))
    finally:
        cache.close()
    return explain(fn, inputs, cache_dir)


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: the autokernel rope ops it holds."""
    seen = SimpleNamespace(ops=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.ops.append([n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS])
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def compile_aot_eager(fn, cache_dir: str):
    return torch.compile(fn, backend=autokernel.backend,
                         options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})


def check_against_reference(fn, compiled, inputs, grads_of: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    """Outputs, and the grads of ``inputs[i]`` for i in ``grads_of``, against the same code in float64."""
    leaves = [t.detach().requires_grad_(i in grads_of) for i, t in enumerate(inputs)]
    outs = compiled(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    dys = [torch.randn(o.shape, generator=_gen(7 + i)).to(o.dtype) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, [leaves[i] for i in grads_of], dys)
    ref_leaves = [(t.detach().to(torch.complex128) if t.is_complex() else t.detach().double()).requires_grad_(
        i in grads_of) for i, t in enumerate(inputs)]
    refs = fn(*ref_leaves)
    refs = refs if isinstance(refs, tuple) else (refs,)
    ref_grads = torch.autograd.grad(refs, [ref_leaves[i] for i in grads_of], [d.double() for d in dys])
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert_close(o, r, dtype, f"{what}: output {i}")
    for i, g, r in zip(grads_of, grads, ref_grads, strict=True):
        assert g.dtype == inputs[i].dtype
        assert_close(g, r, dtype, f"{what}: grad of input {i}")


# ---------------------------------------------------------------- spellings


def _gptj_pair(q, k, sin, cos):
    """GPT-J's attention: each tensor rotated by its own call, cos/sin repeat_interleave'd in each."""
    return gptj_rope(q, sin, cos), gptj_rope(k, sin, cos)


def _commuted_lone(q, cos, sin):
    """The products and their operands swapped; one tensor alone, cos/sin in float32 (the output is float32)."""
    return sin.unsqueeze(1) * rotate_half(q) + cos.unsqueeze(1) * q


def _chunk_rope(q, k, cos, sin):
    """rotate_half with ``chunk`` for the halves (as some ports write it), cos/sin already broadcast."""

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _meta_complex(xq, xk, freqs_cis):
    """Meta Llama's apply_rotary_emb: complex multiplication by ``freqs_cis`` ([S, D/2], viewed to broadcast)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _deepseek_interleave(q, k, cos, sin):
    """DeepSeek V3's ``apply_rotary_pos_emb_interleave``: HF's duplicated-halves cos/sin cut to one value per pair,
    the even and odd columns rotated and written as halves."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    return (torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1),
            torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1))


def _gpt_oss(q, k, cos, sin):
    """GPT-OSS's ``apply_rotary_pos_emb``: cos/sin one value per pair, the halves by ``chunk``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x):
        first_half, second_half = torch.chunk(x, 2, dim=-1)
        return torch.cat((first_half * cos - second_half * sin, second_half * cos + first_half * sin), dim=-1)

    return rotate(q), rotate(k)


def _meta_complex_read_through_casts(xq, xk, freqs_cis):
    """The complex form in float32, read through no-op casts that belong to its readers (Llama 4's q/k norm begins
    with ``x.float()``): the rotation's value then has several holders, all of them read."""
    q, k = _meta_complex(xq, xk, freqs_cis)
    return (q.float() * 2).type_as(q), (k.float() - 1).type_as(k)  # the norm's shape: f(x.float()).type_as(x)


def _inputs(name: str, dtype: torch.dtype):
    b, s, d = 2, 3, 16
    if name == "llama_gqa":  # 4 q heads, 2 k heads
        return [heads(b, s, 4, d, dtype, 1), heads(b, s, 2, d, dtype, 2), *cos_sin(b, s, d, dtype)], (0, 1)
    if name == "neox_partial":  # rotary_dim 6 of 16: 3 pairs, not a power of two
        return [heads(b, s, 3, d, dtype, 1), heads(b, s, 3, d, dtype, 2), *cos_sin(b, s, 6, dtype)], (0, 1)
    if name == "gptj_interleaved":  # [B, S, H, D] (not transposed): the heads run along dim 2
        q = torch.randn(b, s, 3, d, generator=_gen(1)).to(dtype)
        k = torch.randn(b, s, 3, d, generator=_gen(2)).to(dtype)
        ang = torch.randn(b, s, d // 2, generator=_gen(3))
        return [q, k, ang.sin().to(dtype), ang.cos().to(dtype)], (0, 1)
    if name == "chunk_halves":
        cos, sin = cos_sin(b, s, d, dtype)
        return [heads(b, s, 2, d, dtype, 1), heads(b, s, 2, d, dtype, 2), cos[:, None], sin[:, None]], (0, 1)
    if name in ("meta_complex", "meta_complex_casts"):  # [B, S, H, D], GQA 4:2
        freqs = torch.polar(torch.ones(s, d // 2), torch.randn(s, d // 2, generator=_gen(3)))
        q = torch.randn(b, s, 4, d, generator=_gen(1)).to(dtype)
        return [q, torch.randn(b, s, 2, d, generator=_gen(2)).to(dtype), freqs], (0, 1)
    if name == "deepseek_interleave":  # q 4 heads, k one (MLA's shared rotary key)
        return [heads(b, s, 4, d, dtype, 1), heads(b, s, 1, d, dtype, 2), *cos_sin(b, s, d, dtype)], (0, 1)
    if name == "gpt_oss":  # GQA 4:2, cos/sin [B, S, D/2]
        cos, sin = cos_sin(b, s, d, dtype, layout="half_pairs")
        return [heads(b, s, 4, d, dtype, 1), heads(b, s, 2, d, dtype, 2), cos, sin], (0, 1)
    if name == "commuted_lone":
        return [heads(b, s, 3, d, dtype, 1), *cos_sin(b, s, d, torch.float32)], (0,)
    raise KeyError(name)


# name: (fn, dtype, expected flags)
SPELLINGS = {
    "llama_gqa": (llama_rope, "bf16", {"layout": "half", "rotary_dim": 16, "heads": 4, "kv_heads": 2, "cs": "bf16",
                                       "out": "bf16"}),
    "neox_partial": (neox_rope, "fp32", {"layout": "half", "rotary_dim": 6, "heads": 3, "kv_heads": 3, "cs": "fp32",
                                         "out": "fp32"}),
    "gptj_interleaved": (_gptj_pair, "fp16", {"layout": "interleaved", "rotary_dim": 16, "heads": 3, "kv_heads": 3,
                                              "cs": "fp16", "out": "fp16"}),
    "chunk_halves": (_chunk_rope, "fp16", {"layout": "half", "rotary_dim": 16, "heads": 2, "kv_heads": 2, "cs": "fp16",
                                         "out": "fp16"}),
    "meta_complex": (_meta_complex, "bf16", {"layout": "complex", "rotary_dim": 16, "heads": 4, "kv_heads": 2,
                                             "cs": "complex64", "out": "bf16"}),
    "meta_complex_casts": (_meta_complex_read_through_casts, "fp32", {"layout": "complex", "rotary_dim": 16,
                                                                       "heads": 4, "kv_heads": 2, "cs": "complex64",
                                                                       "out": "fp32"}),
    "deepseek_interleave": (_deepseek_interleave, "bf16", {"layout": "deinterleave", "rotary_dim": 16, "heads": 4,
                                                           "kv_heads": 1, "cs": "bf16", "out": "bf16"}),
    "gpt_oss": (_gpt_oss, "bf16", {"layout": "half_pairs", "rotary_dim": 16, "heads": 4, "kv_heads": 2, "cs": "bf16",
                                   "out": "bf16"}),
    "commuted_lone": (_commuted_lone, "bf16", {"layout": "half", "rotary_dim": 16, "heads": 3, "kv_heads": 0,
                                               "cs": "fp32", "out": "fp32"}),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_found_paired_hit_and_matches(name, cache_dir, rewritten):
    fn, dt, flags = SPELLINGS[name]
    dtype = DTYPES[dt]
    inputs, grads_of = _inputs(name, dtype)
    leaves = [t.detach().requires_grad_(i in grads_of) for i, t in enumerate(inputs)]
    found = explain(fn, leaves, cache_dir)
    assert [(i.status, i.flags) for i in found] == [("miss", flags)], found
    assert found[0].dtype == dt and found[0].shape == (2, flags["heads"], 3, 16) and found[0].requires_grad

    assert [i.status for i in make_hits(fn, leaves, cache_dir)] == ["hit"]
    check_against_reference(fn, compile_aot_eager(fn, cache_dir), inputs, grads_of, dtype, name)
    assert [len(ops) for ops in rewritten.ops] == [1], "the hit was not rewritten into one autokernel op"


def test_no_grad_uses_the_forward_only_op(cache_dir, rewritten):
    inputs, _ = _inputs("llama_gqa", torch.bfloat16)
    assert [i.status for i in make_hits(llama_rope, inputs, cache_dir)] == ["hit"]
    with torch.no_grad():
        q_out, k_out = compile_aot_eager(llama_rope, cache_dir)(*inputs)
    assert rewritten.ops == [[torch.ops.autokernel.rope.default]]
    ref_q, ref_k = llama_rope(*[t.double() for t in inputs])
    assert_close(q_out, ref_q, torch.bfloat16, "q")
    assert_close(k_out, ref_k, torch.bfloat16, "k")


def test_three_tensors_share_cos_pair_then_lone(cache_dir):
    """Pairs are made in graph order; a third tensor on the same cos/sin is an instance of its own."""

    def three(q, k, v, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return tuple(x * cos + rotate_half(x) * sin for x in (q, k, v))

    b, s, d = 1, 2, 8
    inputs = [heads(b, s, 2, d, torch.float32, i) for i in range(3)] + list(cos_sin(b, s, d, torch.float32))
    found = explain(three, inputs, cache_dir)
    assert [(i.status, i.flags["kv_heads"]) for i in found] == [("miss", 2), ("miss", 0)], found


# ---------------------------------------------------------------- declines


def _declines(q, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    h = q.shape[-1] // 2
    x1, x2 = q[..., :h], q[..., h:]
    wrong_sign = q * c + torch.cat((x2, -x1), -1) * s
    no_minus = q * c + torch.cat((x2, x1), -1) * s
    reflection = q * c + torch.cat((-x1, x2), -1) * s
    t = q.transpose(-1, -2)  # rotating over the sequence: [B, H, D, S] with cos/sin over S
    t1, t2 = t[..., :h, :], t[..., h:, :]
    other_dim = t * c.transpose(-1, -2) + torch.cat((-t2, t1), -2) * s.transpose(-1, -2)
    first = q[:1]
    grows = first * c + rotate_half(first) * s  # cos/sin have 2 batch rows: the output grows
    column = q * c[..., :1] + rotate_half(q) * s[..., :1]  # one cos per position, not per column
    rot = rotate_half(q)
    reused = q * c + rot * s
    return wrong_sign, no_minus, reflection, other_dim, grows, column, reused, rot


def test_declined_with_reasons(cache_dir, rewritten):
    inputs = [heads(2, 4, 2, 8, torch.bfloat16, 1), *cos_sin(2, 4, 8, torch.bfloat16)]
    found = explain(_declines, inputs, cache_dir)
    assert all(i.status == "declined" for i in found), found
    assert [i.reason for i in found[:-1]] == [
        "the minus is on the other piece (rotation by minus the angle)",
        "no minus on the moved piece: not a rotation",
        "the pieces are in their own order: a reflection, not a rotation",
        "rotates over dim 2, not the last",
        "cos/sin broadcast x (1, 2, 4, 8) to (2, 2, 4, 8)",
        "cos of shape (2, 1, 4, 1) for x of shape (2, 2, 4, 8): not one value per rotated column",
    ], found
    assert re.fullmatch(r"intermediate cat_\d+ is also used by output", found[-1].reason), found[-1]
    outs = compile_aot_eager(_declines, cache_dir)(*inputs)
    for a, b in zip(outs, _declines(*inputs), strict=True):
        assert torch.equal(a, b)
    assert rewritten.ops == [[]]


def test_not_a_rotation_is_not_reported(cache_dir):
    """``x * a + cat(p, q) * b`` of pieces that are not x's own: not RoPE, nothing to report."""
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    assert explain(lambda x, y: x * 2.0 + torch.cat((-y[:, 4:], y[:, :4]), -1) * x, [x, y], cache_dir) == []


# ---------------------------------------------------------------- kernels against the reference


def check_kernels(q, k, cos, sin, layout, rotary_dim, config=SMALL, dq=None, dk=None, tol_dtype=None) -> None:
    """Both outputs and both grads against autograd through the float64 reference."""
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    tol = tol_dtype or q.dtype
    qo, ko = rope_fwd(q, k, cos, sin, layout, rotary_dim, out_dtype, config)
    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True) if k is not None else None
    rq, rk = rope_reference(q64, k64, cos, sin, layout, rotary_dim)
    assert qo.shape == q.shape and qo.dtype == out_dtype and same_layout(qo, q)
    assert_close(qo, rq, tol, "q")
    dq = dq if dq is not None else torch.randn(q.shape, generator=_gen(5)).to(out_dtype)
    if k is None:
        assert ko is None
        rq.backward(dq.double())
    else:
        assert_close(ko, rk, tol, "k")
        dk = dk if dk is not None else torch.randn(k.shape, generator=_gen(6)).to(out_dtype)
        torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    # In q's and k's layouts, as the training op asks for them (dq itself is contiguous here).
    orders = (dim_order(q), dim_order(k) if k is not None else None)
    gq, gk = rope_bwd(dq, dk, cos, sin, layout, rotary_dim, q.dtype, config, out_orders=orders)
    assert gq.dtype == q.dtype and same_layout(gq, q)
    assert gk is None or same_layout(gk, k)
    assert_close(gq, q64.grad, tol, "dq")
    if k is not None:
        assert_close(gk, k64.grad, tol, "dk")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["half", "interleaved", "complex", "deinterleave", "half_pairs"])
def test_dtypes_layouts_gqa(dtype, layout):
    cos, sin = cos_sin(2, 3, 16, dtype, layout=layout)
    check_kernels(heads(2, 3, 3, 16, dtype, 1), heads(2, 3, 1, 16, dtype, 2), cos[:, None], sin[:, None], layout, 16)


@pytest.mark.parametrize(("b", "s", "hq", "hk", "d", "r"), [
    (1, 1, 5, 5, 64, 64),  # one token (decode), odd heads
    (2, 2, 3, 1, 128, 128),  # head dim 128, GQA 3:1
    (1, 3, 7, 2, 64, 24),  # partial: 12 pairs (not a power of two) of 32, 40 columns passed through
    (2, 1, 2, 0, 80, 32),  # partial, q alone, head dim 80
], ids=["seq1", "d128_gqa", "partial_r24", "partial_lone_d80"])
def test_awkward_shapes(b, s, hq, hk, d, r):
    cos, sin = cos_sin(b, s, r, torch.bfloat16)
    k = heads(b, s, hk, d, torch.bfloat16, 2) if hk else None
    check_kernels(heads(b, s, hq, d, torch.bfloat16, 1), k, cos[:, None], sin[:, None], "half", r,
                  config=RopeConfig())


@pytest.mark.parametrize(("b", "s", "hq", "hk", "d", "r"), [
    (1, 1, 5, 1, 64, 64),  # one token, MQA (DeepSeek's k_rot has one head)
    (1, 3, 7, 2, 64, 24),  # partial: 12 pairs of 32
], ids=["seq1_mqa", "partial_r24"])
def test_deinterleave_awkward_shapes(b, s, hq, hk, d, r):
    cos, sin = cos_sin(b, s, r, torch.bfloat16, layout="deinterleave")
    check_kernels(heads(b, s, hq, d, torch.bfloat16, 1), heads(b, s, hk, d, torch.bfloat16, 2), cos[:, None],
                  sin[:, None], "deinterleave", r, config=RopeConfig())


def test_ranks_and_broadcasts():
    # [S, D] alone, cos [S, D]
    cos, sin = cos_sin(1, 5, 8, torch.float32)
    check_kernels(torch.randn(5, 8), None, cos[0], sin[0], "half", 8)
    # [S, H, D] (heads along the last-but-one dim), cos [S, 1, D]; k with fewer heads
    check_kernels(torch.randn(5, 4, 8), torch.randn(5, 2, 8), cos[0, :, None], sin[0, :, None], "half", 8)
    # one table for every batch row: cos [S, D] against [B, H, S, D]
    check_kernels(heads(3, 5, 2, 8, torch.float32, 1), None, cos[0], sin[0], "interleaved", 8)
    # cos/sin per head (nothing assumes them shared), with unequal halves (c1 != c2)
    c, s = torch.randn(2, 3, 4, 8, generator=_gen(1)), torch.randn(1, 3, 4, 8, generator=_gen(2))
    check_kernels(heads(2, 4, 3, 8, torch.float32, 3), heads(2, 4, 3, 8, torch.float32, 4), c, s, "half", 8)


def test_float32_cos_with_bf16_q():
    cos, sin = cos_sin(2, 3, 16, torch.float32)
    check_kernels(heads(2, 3, 2, 16, torch.bfloat16, 1), heads(2, 3, 2, 16, torch.bfloat16, 2), cos[:, None],
                  sin[:, None], "half", 16)


def test_strided_operands():
    cos, sin = cos_sin(2, 3, 16, torch.bfloat16)
    q = heads(2, 3, 4, 16, torch.bfloat16, 1, pad=5)  # rows of a wider (qkv) tensor
    k = torch.randn(2, 2, 16, 3, generator=_gen(2)).to(torch.bfloat16).transpose(-1, -2)  # D not unit-stride: copied
    dq = torch.randn(2, 3, 4, 20, generator=_gen(3)).to(torch.bfloat16)[..., :16].transpose(1, 2)
    dk = torch.randn(2, 3, 16, generator=_gen(4)).to(torch.bfloat16)[:, None].expand(2, 2, 3, 16)  # stride 0
    assert q.stride(-1) == 1 and not q.is_contiguous() and k.stride(-1) != 1
    check_kernels(q, k, cos[:, None], sin[:, None], "half", 16, dq=dq, dk=dk)


def test_deterministic_and_zero_size():
    cos, sin = cos_sin(2, 9, 32, torch.bfloat16)
    q, k = heads(2, 9, 4, 32, torch.bfloat16, 1), heads(2, 9, 2, 32, torch.bfloat16, 2)
    runs = [(*rope_fwd(q, k, cos[:, None], sin[:, None], "half", 32, torch.bfloat16, SMALL),
             *rope_bwd(q, k, cos[:, None], sin[:, None], "half", 32, torch.bfloat16, SMALL)) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    empty = heads(2, 0, 4, 32, torch.bfloat16, 1)
    qo, ko = rope_fwd(empty, None, cos[:, None, :0], sin[:, None, :0], "half", 32, torch.bfloat16, SMALL)
    assert qo.shape == empty.shape and ko is None


def test_bad_arguments():
    q, cos = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        rope_fwd(q, None, cos, cos, "spiral", 8, torch.float32, SMALL)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rope_fwd(q, None, cos, cos, "half", 7, torch.float32, SMALL)
    with pytest.raises(ValueError, match="does not pair with q"):
        rope_fwd(q, q.double(), cos, cos, "half", 8, torch.float32, SMALL)
    with pytest.raises(ValueError, match=r"cos of shape \(2, 4\)"):
        rope_fwd(q, None, cos[:, :4], cos, "half", 8, torch.float32, SMALL)
    with pytest.raises(ValueError, match="does not broadcast"):
        rope_fwd(q, None, torch.randn(3, 8), cos, "half", 8, torch.float32, SMALL)


def test_config_round_trip_and_errors():
    cfg = RopeConfig(fwd_block_h=16, fwd_num_warps=8, bwd_block_h=1, bwd_num_warps=2)
    assert RopeConfig.from_dict(cfg.to_dict()) == cfg
    for bad, needle in [({"fwd_block": 1}, "fwd_block"), ({"fwd_block_h": 3}, "fwd_block_h"),
                        ({"bwd_num_warps": 3}, "bwd_num_warps"), ({"bwd_block_h": 512}, "bwd_block_h")]:
        with pytest.raises(ValueError, match=needle):
            RopeConfig.from_dict(bad)


# ---------------------------------------------------------------- the ops


def test_opcheck():
    ops = torch.ops.autokernel
    q, k = heads(2, 3, 4, 8, torch.float32, 1), heads(2, 3, 2, 8, torch.float32, 2)
    cos, sin = (t[:, None] for t in cos_sin(2, 3, 8, torch.float32))
    torch.library.opcheck(ops.rope, (q, k, cos, sin, "half", 8, torch.float32, True, False, ""))
    torch.library.opcheck(ops.rope, (q.bfloat16(), None, cos, sin, "interleaved", 8, torch.float32, False, False,
                                     ""))
    torch.library.opcheck(ops.rope_train, (q.requires_grad_(True), k.requires_grad_(True), cos[..., :6],
                                           sin[..., :6], "half", 6, torch.float32, True, True, ""))
    qs, ks = dim_order(q), dim_order(k)
    torch.library.opcheck(ops.rope_backward, (q.detach(), k.detach(), cos, sin, "half", 8, torch.float32, qs, ks, ""))
    torch.library.opcheck(ops.rope_backward, (q.detach(), None, cos, sin, "interleaved", 8, torch.bfloat16, qs, [],
                                              ""))
    freqs = torch.polar(torch.ones(3, 4), torch.randn(3, 4, generator=_gen(3)))  # the complex layout's freqs_cis
    torch.library.opcheck(ops.rope, (q.detach(), k.detach(), freqs, freqs, "complex", 8, torch.float32, False, True,
                                     ""))
    torch.library.opcheck(ops.rope_backward, (q.detach(), k.detach(), freqs, freqs, "complex", 8, torch.float32, qs,
                                              ks, ""))


def test_outputs_and_gradients_keep_their_inputs_layout():
    """q as HF passes it (a transposed [B, S, H, D] view, of a wider row too): in training the gradients come back
    in [B, S, H, D] storage, so the projection's backward reads them without a copy; the rotated q and k too where
    asked (``keep_q_layout``/``keep_k_layout``: the backend asks where SDPA reads them), else contiguous (a matmul's
    layout); a contiguous input gives contiguous outputs; an input whose last dim is not unit-strided, contiguous
    ones (the kernel's one assumption)."""
    ops = torch.ops.autokernel
    cos, sin = (t[:, None] for t in cos_sin(2, 3, 8, torch.float32))
    for pad, keep_q, keep_k in ((0, True, True), (2, True, False), (0, False, True), (2, False, False)):
        q, k = heads(2, 3, 4, 8, torch.float32, 1, pad), heads(2, 3, 2, 8, torch.float32, 2, pad)
        for op in (ops.rope, ops.rope_train):
            qr, kr = q.detach().requires_grad_(op is ops.rope_train), k.detach().requires_grad_(op is ops.rope_train)
            qo, ko = op(qr, kr, cos, sin, "half", 8, torch.float32, keep_q, keep_k, "")
            for out, keep in ((qo, keep_q), (ko, keep_k)):
                assert (out.transpose(1, 2) if keep else out).is_contiguous(), (keep, out.stride())
            rq, rk = rope_reference(q, k, cos, sin, "half", 8)
            assert_close(qo, rq, torch.float32, "q")
            assert_close(ko, rk, torch.float32, "k")
        # autograd.grad: the op's own gradients (a leaf's .grad may be copied into the leaf's layout).
        gq, gk = torch.autograd.grad((qo, ko), (qr, kr), (torch.randn_like(qo).contiguous(),
                                                          torch.randn_like(ko).contiguous()))
        assert gq.transpose(1, 2).is_contiguous() and gk.transpose(1, 2).is_contiguous()
    flat = torch.randn(2, 4, 3, 8, generator=_gen(5))
    assert ops.rope(flat, None, cos, sin, "half", 8, torch.float32, True, True, "")[0].is_contiguous()
    columns = torch.randn(2, 4, 8, 3, generator=_gen(6)).transpose(-1, -2)  # D strided: copied, then contiguous
    assert ops.rope(columns, None, cos, sin, "half", 8, torch.float32, True, True, "")[0].is_contiguous()


def _rotated_and_returned(qb, kb, cos, sin):
    """q and k as models pass them (transposed [B, S, H, D] views), rotated and returned by the graph."""
    q, k = qb.transpose(1, 2), kb.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate(q, "half") * sin, k * cos + rotate(k, "half") * sin


def test_returned_rotations_keep_eagers_layout(cache_dir, rewritten):
    """Where the graph returns the rotated q and k (no SDPA reads them), they come back in eager's layout, the
    inputs' for this elementwise math: contiguous ones would reach the caller in another layout, or be copied back
    by Inductor."""
    g = _gen(11)
    leaves = [torch.randn(2, 5, 4, 16, generator=g).requires_grad_(True),
              torch.randn(2, 5, 2, 16, generator=g).requires_grad_(True), *cos_sin(2, 5, 16, torch.float32)]
    assert [i.status for i in make_hits(_rotated_and_returned, leaves, cache_dir)] == ["hit"]
    torch._dynamo.reset()
    out = torch.compile(_rotated_and_returned, backend="autokernel", options={"autokernel.cache_dir": cache_dir})(
        *leaves)
    assert rewritten.ops == [[torch.ops.autokernel.rope_train.default]]
    expected = _rotated_and_returned(*leaves)
    assert [o.stride() for o in out] == [e.stride() for e in expected]
    for o, e, name in zip(out, expected, "qk", strict=True):
        assert_close(o, e.double(), torch.float32, name)


@pytest.mark.parametrize("layout", ["half", "deinterleave", "half_pairs"])
def test_trained_cos_sin_get_their_gradient(layout):
    """A learned cos/sin table: the op's autograd formula gives it its gradient (summed over the heads)."""
    q, k = heads(2, 3, 4, 8, torch.float32, 1), heads(2, 3, 2, 8, torch.float32, 2)
    cos, sin = (t[:, None].clone().requires_grad_(True) for t in cos_sin(2, 3, 8, torch.float32, layout=layout))
    qo, ko = torch.ops.autokernel.rope_train(q.requires_grad_(True), k.requires_grad_(True), cos, sin, layout, 8,
                                             torch.float32, False, False, "")
    dq, dk = torch.randn(qo.shape, generator=_gen(1)), torch.randn(ko.shape, generator=_gen(2))
    torch.autograd.backward((qo, ko), (dq, dk))
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, cos, sin)]
    rq, rk = rope_reference(*leaves, layout, 8)
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    for name, got, ref in zip(("dq", "dk", "dcos", "dsin"), (q.grad, k.grad, cos.grad, sin.grad), leaves, strict=True):
        assert_close(got, ref.grad, torch.float32, name)
    assert torch.equal(rotate(torch.arange(4.0), "half"), torch.tensor([-2.0, -3.0, 0.0, 1.0]))
    assert torch.equal(rotate(torch.arange(4.0), "interleaved"), torch.tensor([-1.0, 0.0, -3.0, 2.0]))


# ---------------------------------------------------------------- ak-tune


def test_problem_shape_flags_and_bytes():
    from autokernel.lowering.rope.problem import RopeProblem

    p = RopeProblem({"kv_heads": "8"}, "bf16", [4, 32, 4096, 128], "cpu")
    assert (p.hidden, p.rows, p.flags) == (128, 4 * 32 * 4096, {
        "layout": "half", "rotary_dim": 128, "heads": 32, "kv_heads": 8, "cs": "bf16", "out": "bf16"})
    qk, cs = 4 * 4096 * (32 + 8) * 128 * 2, 2 * 4 * 4096 * 128 * 2
    assert p.bytes_moved() == {"fwd": 2 * qk + cs, "train": 2 * (2 * qk + cs)}
    assert {phase for phase, _ in p.candidates()} == {"fwd", "bwd"}
    # what verify_entry passes: [rows, D] and the entry's flags
    assert RopeProblem(p.flags, "bf16", [64, 128], "cpu").key == p.key
    complex_ = RopeProblem({"layout": "complex", "kv_heads": 0}, "bf16", [1, 2, 3, 8], "cpu")
    assert (complex_.flags["cs"], complex_.flags["out"]) == ("complex64", "fp32")
    # 48 values of q read in bf16 and written in fp32; 3 positions x 4 pairs of complex64 freqs_cis
    assert complex_.bytes_moved()["fwd"] == 48 * 2 + 48 * 4 + 3 * 4 * 8
    # DeepSeek's and GPT-OSS's layouts: cos and sin hold one bf16 value per pair (4 a position)
    for layout in ("deinterleave", "half_pairs"):
        pairs = RopeProblem({"layout": layout, "kv_heads": 0}, "bf16", [1, 2, 3, 8], "cpu")
        assert pairs.bytes_moved()["fwd"] == 48 * 2 + 48 * 2 + 2 * 3 * 4 * 2
    for flags, shape, needle in [({"layout": "spiral"}, [1, 2, 3, 8], "flag layout"),
                                 ({"layout": "complex", "rotary_dim": 4}, [1, 2, 3, 8], "full rotary"),
                                 ({"rotary_dim": "5"}, [1, 2, 3, 8], "rotary_dim must be even"),
                                 ({"heads": "3"}, [1, 2, 3, 8], "flag heads=3"),
                                 ({"cs": "fp32", "out": "bf16"}, [1, 2, 3, 8], "promoted dtype"),
                                 ({}, [2, 3, 8], r"shape must be \[B, heads, S, D\]")]:
        with pytest.raises(ValueError, match=needle):
            RopeProblem(flags, "bf16", shape, "cpu")


def test_ak_tune_miss_then_hit(tmp_path):
    from autokernel.playbook.tuner import TuneRequest, tune

    inputs, _ = _inputs("llama_gqa", torch.bfloat16)
    [miss] = explain(llama_rope, inputs, str(tmp_path))
    assert miss.status == "miss"
    cache = KernelCache(tmp_path, device="cpu")
    result = tune(TuneRequest("rope", miss.flags, miss.dtype, list(miss.shape)), cache, torch.device("cpu"),
                  budget_s=300)
    assert result.status == "written", result.detail
    [(_, entry)] = list(cache.entries())
    cache.close()
    assert entry["checks"] == ["smoke", "shape sweep", "stability", "determinism", "edge cases"]
    assert [i.status for i in explain(llama_rope, inputs, str(tmp_path))] == ["hit"]
    # The tuner's last race serves the entry through torch.compile: the problem's own q/k function must hit it
    # (it once rotated q before reading k, the matcher saw two unpaired instances, and the race had no time).
    from autokernel.lowering import families
    from autokernel.playbook.worker import handle

    problem = families()["rope"].problem(miss.flags, miss.dtype, list(miss.shape), "cpu")
    problem.max_rows = 64
    reply = handle(problem, ("in_context", entry), ["fwd"])
    assert reply["status"] == "ok" and reply["fwd_ms"] > 0 and reply["inductor_fwd_ms"] > 0, reply


@pytest.mark.parametrize("flags", [{"layout": "half", "kv_heads": 2},
                                   {"layout": "half", "rotary_dim": 4, "kv_heads": 1},
                                   {"layout": "interleaved", "kv_heads": 4},
                                   {"layout": "complex", "kv_heads": 2},
                                   {"layout": "deinterleave", "kv_heads": 1},
                                   {"layout": "half_pairs", "kv_heads": 2}])
def test_problem_eager_pairs_q_with_k(flags, cache_dir):
    """The function the tuner races in context (``problem.eager``) is one paired instance, as in a model."""
    from autokernel.lowering import families

    problem = families()["rope"].problem(flags, "bf16", [2, 4, 8, 16], "cpu")
    case = problem.case(64, 16)
    report = autokernel.explain(problem.eager, case.q, case.k, case.cos, case.sin,
                                options={"autokernel.cache_dir": cache_dir})
    [inst] = report.instances
    assert (inst.pattern, inst.flags["heads"], inst.flags["kv_heads"]) == ("rope", 4, flags["kv_heads"]), inst


def test_trained_freqs_cis_gets_its_gradient():
    """The complex form with a learned ``freqs_cis``: its gradient ``sum(dy * conj(x))`` through the cos slot."""
    q, k = torch.randn(2, 3, 4, 8, generator=_gen(1)), torch.randn(2, 3, 2, 8, generator=_gen(2))
    freqs = torch.polar(torch.rand(3, 1, 4, generator=_gen(3)) + 0.5, torch.randn(3, 1, 4, generator=_gen(4)))
    freqs.requires_grad_(True)
    qo, ko = torch.ops.autokernel.rope_train(q.requires_grad_(True), k.requires_grad_(True), freqs, freqs, "complex",
                                             8, torch.float32, False, False, "")
    dq, dk = torch.randn(qo.shape, generator=_gen(5)), torch.randn(ko.shape, generator=_gen(6))
    torch.autograd.backward((qo, ko), (dq, dk))
    leaves = [q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True),
              freqs.detach().to(torch.complex128).requires_grad_(True)]
    rq, rk = (torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * leaves[2]).flatten(-2)
              for x in leaves[:2])
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    assert_close(qo, rq, torch.float32, "q")
    for name, got, ref in zip(("dq", "dk"), (q.grad, k.grad), leaves[:2], strict=True):
        assert_close(got, ref.grad, torch.float32, name)
    assert_close(torch.view_as_real(freqs.grad), torch.view_as_real(leaves[2].grad), torch.float32, "dfreqs")
