"""Constant attention masks handed to SDPA as what they are (``autokernel/backend/attention_mask.py``).

Each mask below is built inside the compiled function, as transformers builds its causal mask; the backend must
rewrite exactly the masks equal to SDPA's ``is_causal=True`` (or to no mask), decline every other one with its
reason, and the compiled function must give eager's answer either way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import force_sdpa_causal_mask, mask_rewrite_step, sdpa_llama
from torch.fx import GraphModule

import autokernel
from autokernel.backend.attention_mask import apply_mask_rewrites, find_mask_rewrites

OPTIONS = {"autokernel.compiler": "aot_eager"}
L, S = 6, 6


def _qkv(q_len: int = L, kv_len: int = S, heads: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(q_len * 100 + kv_len)
    return tuple(torch.randn(2, heads, n, 8, generator=g) for n in (q_len, kv_len, kv_len))


def causal_hf(q, k, v):
    """transformers' spelling: kv index <= q index from two aranges, expanded over the batch."""
    q_idx = torch.arange(q.shape[-2], device=q.device)[None, None, :, None]
    kv_idx = torch.arange(k.shape[-2], device=q.device)[None, None, None, :]
    mask = (kv_idx <= q_idx).expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_float_inf(q, k, v):
    mask = torch.full((q.shape[-2], k.shape[-2]), float("-inf"), device=q.device).triu(1)
    return F.scaled_dot_product_attention(q, k, v, mask)


FLOAT_MIN_SCALE = 0.3  # causal_float_min's softmax scale (not SDPA's default: the rewrite must keep it)


def causal_float_min(q, k, v):
    """Older transformers: an additive mask of 0 and the dtype's minimum."""
    lo = torch.finfo(q.dtype).min
    mask = torch.full((q.shape[-2], k.shape[-2]), lo, device=q.device, dtype=q.dtype).triu(1)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=FLOAT_MIN_SCALE)


def all_allowed(q, k, v):
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sliding_window(q, k, v):
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < 3))


def bottom_right(q, k, v):
    """A decode step over a prefix: causal aligned to the bottom right, which is_causal=True is not."""
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def alibi_bias(q, k, v):
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    bias = (j - i).float() * 0.5
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(j > i, float("-inf")))


def padding_from_input(q, k, v, keep):
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() & keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def changed_in_place(q, k, v):
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    mask[0, 1] = True  # no longer causal: the check must see the write
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def repeat_kv(x, n):
    """transformers' repeat_kv."""
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def causal_gqa(q, k, v):
    """transformers' SDPA path with a mask: key and value heads repeated up to q's first."""
    n = q.shape[1] // k.shape[1]
    return causal_hf(q, repeat_kv(k, n), repeat_kv(v, n))


def causal_gqa_other_order(q, k, v):
    """Heads repeated as [kv0, kv1, kv0, kv1] (repeat, not repeat_interleave): not what enable_gqa means."""
    n = q.shape[1] // k.shape[1]
    return causal_hf(q, k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1))


def _verdicts(fn, *args) -> list[tuple[str, str, str]]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *args, options=OPTIONS)
    return [(i.status, i.flags.get("mask", ""), i.reason) for i in report.instances if i.pattern == "attention_mask"]


def _compiled_matches_eager(fn, *args) -> None:
    torch._dynamo.reset()
    leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    ref = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    out = torch.compile(fn, backend="autokernel", options=OPTIONS)(*leaves)
    expected = fn(*ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(leaves, ref, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, kind", [(causal_hf, "causal"), (causal_float_inf, "causal"),
                                      (causal_float_min, "causal"), (all_allowed, "none")])
def test_constant_masks_equal_to_sdpa_s_own_are_rewritten(fn, kind) -> None:
    verdicts = _verdicts(fn, *_qkv())
    assert [(status, flag) for status, flag, _ in verdicts] == [("rewritten", kind)], verdicts
    _compiled_matches_eager(fn, *_qkv())


@pytest.mark.parametrize("fn, q_len, kv_len, why", [
    (sliding_window, L, S, "neither SDPA's causal mask"),
    (bottom_right, 3, 7, "neither SDPA's causal mask"),
    (alibi_bias, L, S, "values other than 0 and -inf"),
    (changed_in_place, L, S, "in place"),
])
def test_other_constant_masks_are_declined(fn, q_len, kv_len, why) -> None:
    verdicts = _verdicts(fn, *_qkv(q_len, kv_len))
    assert len(verdicts) == 1 and verdicts[0][0] == "declined" and why in verdicts[0][2], verdicts
    _compiled_matches_eager(fn, *_qkv(q_len, kv_len))


@pytest.mark.parametrize("fn, gqa", [(causal_gqa, 3), (causal_gqa_other_order, None)])
def test_repeated_key_value_heads_go_back_to_enable_gqa(fn, gqa) -> None:
    """Where the mask goes, transformers' repeat_kv of key and value goes too (SDPA's enable_gqa reads query head h
    against key/value head h // n, which is what repeat_kv built); a repeat in another order stays."""
    q, _, _ = _qkv(heads=6)
    _, k, v = _qkv(heads=2)
    torch._dynamo.reset()
    report = autokernel.explain(fn, q, k, v, options=OPTIONS)
    assert [(i.status, i.flags.get("gqa")) for i in report.instances] == [("rewritten", gqa)], report
    _compiled_matches_eager(fn, q, k, v)


def test_a_mask_read_from_an_input_is_declined() -> None:
    keep = torch.tensor([[True] * S, [True] * (S - 2) + [False] * 2])
    verdicts = _verdicts(padding_from_input, *_qkv(), keep)
    assert len(verdicts) == 1 and verdicts[0][0] == "declined" and "graph input" in verdicts[0][2], verdicts
    _compiled_matches_eager(padding_from_input, *_qkv(), keep)


def test_bottom_right_equals_top_left_when_the_lengths_agree() -> None:
    """With as many queries as keys both alignments are the same mask: rewritten."""
    assert [v[:2] for v in _verdicts(bottom_right, *_qkv(5, 5))] == [("rewritten", "causal")]


def test_the_rewrite_drops_the_mask_and_keeps_the_call_s_other_arguments() -> None:
    graphs: list[GraphModule] = []

    def capture(gm: GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(causal_float_min, backend=capture)(*_qkv())
    gm = graphs[0]
    rewrites = find_mask_rewrites(gm)
    assert [r.status for r in rewrites] == ["rewritten"]
    before = {n.name for n in gm.graph.nodes}
    apply_mask_rewrites(gm, rewrites)
    gm.recompile()
    sdpa = rewrites[0].sdpa
    assert sdpa.args[3:] == () and sdpa.kwargs["attn_mask"] is None and sdpa.kwargs["is_causal"] is True
    assert math.isclose(sdpa.kwargs["scale"], 0.3) and sdpa.kwargs["dropout_p"] == 0.0
    dropped = before - {n.name for n in gm.graph.nodes}
    assert any("full" in name for name in dropped) and any("triu" in name for name in dropped), dropped
    q, k, v = _qkv()
    torch.testing.assert_close(gm(q, k, v)[0], causal_float_min(q, k, v), rtol=1e-5, atol=1e-5)


def test_the_option_turns_the_rewrite_off() -> None:
    torch._dynamo.reset()
    report = autokernel.explain(causal_hf, *_qkv(), options={**OPTIONS, "autokernel.attention_masks": False})
    assert not [i for i in report.instances if i.pattern == "attention_mask"]


def test_transformers_causal_mask_under_compile_becomes_is_causal(monkeypatch) -> None:
    """A 2-layer Llama with SDPA attention, as it compiles with torch < 2.14: transformers cannot skip its causal
    mask while Dynamo traces (``_ignore_causal_mask_sdpa`` is False), so each layer's SDPA gets the mask and
    repeated key/value heads. Both calls are rewritten, and the loss and every gradient match eager's."""
    pytest.importorskip("transformers")
    force_sdpa_causal_mask(monkeypatch)
    model = sdpa_llama(hidden=64, vocab=128, max_positions=64)
    ids = torch.randint(0, 128, (2, 24))
    masks, (loss, grads), (expected, ref) = mask_rewrite_step(model, ids, OPTIONS)
    verdicts = [(i.status, i.flags.get("mask"), i.flags.get("gqa")) for i in masks]
    assert verdicts == [("rewritten", "causal", 2)] * 2, masks
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_symbolic_sizes_are_declined() -> None:
    """With dynamic=True the mask's sizes are symbolic: its value is not known at compile time, the call keeps it,
    and the result is eager's."""
    graphs: list[GraphModule] = []

    def capture(gm: GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(causal_hf, backend=capture, dynamic=True)(*_qkv())
    rewrites = find_mask_rewrites(graphs[0])
    assert [r.status for r in rewrites] == ["declined"] and "symbolic" in rewrites[0].reason, rewrites
    torch._dynamo.reset()
    q, k, v = _qkv(5, 5)
    out = torch.compile(causal_hf, backend="autokernel", options=OPTIONS, dynamic=True)(q, k, v)
    torch.testing.assert_close(out, causal_hf(q, k, v), rtol=1e-5, atol=1e-5)
