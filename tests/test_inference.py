"""Inference on the cache: generate() with a static KV cache, no_grad, and prompts of many lengths."""

from __future__ import annotations

import logging

import pytest
import torch
from models import compile_log_statuses, serve_every_miss

from autokernel.cache import KernelCache

transformers = pytest.importorskip("transformers")

VOCAB = 128


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # its softmax is a pattern too
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                          disable_compile=True, pad_token_id=0, **kw)


def test_generate_with_a_static_cache_matches_eager_tokens(tmp_path, caplog):
    """Greedy generate() through the compiled forward (prefill rows, then one row per step), first on
    misses, then served from the cache: the same tokens as eager, and the decode steps hit."""
    model = _llama()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _generate(model, ids)
    eager_forward = model.forward
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    model.forward = torch.compile(eager_forward, backend="autokernel", options=options)
    with torch.no_grad():
        assert torch.equal(_generate(model, ids), expected)
    assert serve_every_miss(tmp_path, "cpu") >= 3  # RMSNorm (plain and with the residual), SwiGLU, softmax, ...

    torch._dynamo.reset()
    model.forward = torch.compile(eager_forward, backend="autokernel", options=options)
    caplog.set_level(logging.INFO, logger="autokernel")
    with torch.no_grad():
        assert torch.equal(_generate(model, ids), expected)
    statuses = compile_log_statuses(caplog)
    assert statuses and all(s.endswith(" hit") for s in statuses), statuses
    assert {s.split()[0] for s in statuses} >= {"rms_norm", "swiglu", "softmax"}, statuses
    assert KernelCache(tmp_path, device="cpu").wanted() == []  # nothing new was missed


def test_prompts_of_many_lengths_compile_twice_then_never(tmp_path, caplog):
    """Served from the cache, a first prompt compiles statically, the second length recompiles with dynamic
    sizes (automatic dynamic), and every later length reuses that graph: our rewrite adds no guards on
    sizes, and the ops pick their kernels from the actual rows at run time."""
    from torch._dynamo.utils import counters

    model = _llama()
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (1, seq), generator=gen) for seq in (5, 9, 12, 17, 30)]
    with torch.inference_mode():
        compiled = torch.compile(model, backend="autokernel", options=options)
        for ids in prompts[:2]:  # the static and the dynamic graph record their misses
            compiled(ids, use_cache=False)
    assert serve_every_miss(tmp_path, "cpu") >= 3
    torch._dynamo.reset()
    counters.clear()
    caplog.set_level(logging.INFO, logger="autokernel")
    compiled = torch.compile(model, backend="autokernel", options=options)
    with torch.inference_mode():
        for ids in prompts:
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    statuses = compile_log_statuses(caplog)
    assert statuses and all(s.endswith(" hit") for s in statuses), statuses
