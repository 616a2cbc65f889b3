"""Inference on the cache: generate() with a static KV cache, no_grad, and prompts of many lengths."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from models import compile_log_statuses, serve_every_miss

from autokernel.cache import KernelCache

transformers = pytest.importorskip("transformers")

VOCAB = 128


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


def test_inference_workloads_record_forward_only_misses_per_row_bucket(tmp_path):
    """``ak-tune --inference``'s workloads (prefill of the inputs, a decode step at each batch size, static KV
    cache, inference_mode) record their misses as forward-only requests, one per row bucket; a training step of
    the same model makes the prefill bucket's requests training ones."""
    from autokernel.cache import row_bucket
    from autokernel.playbook.model import Workload, inference_workloads

    model = _llama()
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    workloads = inference_workloads(model, {"input_ids": ids, "labels": ids}, decode_batches=(1, 3))
    assert [w.name for w in workloads] == ["prefill 1x8", "decode step at batch 1", "decode step at batch 3"]
    cache = KernelCache(tmp_path, device="cpu")
    for w in workloads:
        torch._dynamo.reset()
        w.run(torch.compile(model, backend="autokernel", options=options), model)
        if w is workloads[0]:
            prefill = {key for key, _ in cache.wanted()}
    wanted = [w for _, w in cache.wanted()]
    swiglu = {row_bucket(w["rows"]): w["train"] for w in wanted if w["pattern"] == "swiglu"}
    assert swiglu == {8: False, 1: False, 4: False}, wanted  # prefill 8 rows, decode 1 and 3 (bucket 4)
    assert not any(w["train"] for w in wanted)

    torch._dynamo.reset()
    Workload("training step", {"input_ids": ids, "labels": ids}).run(
        torch.compile(model.train(), backend="autokernel", options=options), model)
    trained = {key for key, w in cache.wanted() if w["train"]}
    assert prefill <= trained
    assert trained - prefill == {key for key in trained if "/linear_cross_entropy/" in key}  # the loss is new


def test_a_forward_only_request_is_tuned_and_served_forward_only(tmp_path, caplog):
    """A forward-only request runs forward candidates only; its entry serves the forward pass, and a
    training compile of the same shape is a miss that records a training request (not Inductor's win)."""
    from models import HFLlama

    from autokernel.playbook.tuner import TuneRequest, tune

    cache = KernelCache(tmp_path, device="cpu")
    flags = {"mode": "gemma", "offset": 0.0, "weight": "fp32", "out": "fp32"}  # HFLlama in fp32: no rounding
    request = TuneRequest("rms_norm", flags, "fp32", [4, 32], forward_only=True)
    result = tune(request, cache, torch.device("cpu"), budget_s=0.0)
    assert result.status == "written" and result.candidates == 1, result
    assert result.times["train_ms"] is None and result.times["fwd_ms"] is not None
    (entry,) = [e for _, e in cache.entries()]
    assert entry["passes"] == ["fwd"] and entry["winner"] == {"fwd": "autokernel", "train": "inductor"}
    rows = (Path(result.run_dir) / "results.tsv").read_text().splitlines()[1:]
    assert rows and all(r.split("\t")[1] == "fwd" for r in rows), rows
    assert Path(result.run_dir).name.endswith("-fwd")

    norm = HFLlama(32)
    x = torch.randn(4, 32)
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    caplog.set_level(logging.INFO, logger="autokernel")
    with torch.no_grad():
        torch.compile(norm, backend="autokernel", options=options)(x)
    assert compile_log_statuses(caplog) == ["rms_norm hit"]
    caplog.clear()
    torch._dynamo.reset()
    torch.compile(norm, backend="autokernel", options=options)(x.requires_grad_())
    assert compile_log_statuses(caplog) == ["rms_norm miss"]
    assert "was tuned for fwd only, not train" in caplog.text
    (wanted,) = [w for _, w in cache.wanted()]
    assert wanted["train"] is True
    assert TuneRequest.from_wanted(wanted).forward_only is False


def test_ak_tune_inference_tunes_prefill_and_decode_buckets_forward_only(tmp_path, capsys, monkeypatch):
    """``ak-tune --hf-config ... --inference``: the prefill's and the decode steps' misses are ranked and tuned
    forward-only, and the cache then serves both row buckets."""
    from autokernel.playbook import cli, tuner

    monkeypatch.setattr(tuner, "INTERPRETER_CANDIDATES", 1)  # one candidate per shape: the plumbing, quickly
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    cfg.save_pretrained(tmp_path / "cfg")
    args = ["--hf-config", str(tmp_path / "cfg" / "config.json"), "--inference", "--batch", "1", "--seq", "8",
            "--decode-batches", "1", "--cache-dir", str(tmp_path / "c"), "-q"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "inference (prefill 1x8, decode step at batch 1)" in out and "fwd-only" in out, out
    cache = KernelCache(tmp_path / "c", device="cpu")
    entries = [e for _, e in cache.entries()]
    assert entries and all(e["passes"] == ["fwd"] and e["winner"]["train"] == "inductor" for e in entries)
    buckets = {(e["pattern"], e["flags"].get("residual", False)): set() for e in entries}
    for e in entries:
        buckets[e["pattern"], e["flags"].get("residual", False)].add(e["row_bucket"])
    # prefill: 8 rows (rope: 4 heads x 8 positions); decode: 1 row (rope: 4)
    assert buckets == {("rms_norm", False): {1, 8}, ("rms_norm", True): {1, 8}, ("swiglu", False): {1, 8},
                       ("rope", False): {4, 32}}, buckets
    assert cache.wanted() == []
