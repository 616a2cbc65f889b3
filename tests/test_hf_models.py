"""An unmodified transformers model: every RMSNorm (and the lm_head + loss) found, tuned, served, and the step
still right."""

from __future__ import annotations

import re

import pytest
import torch
from models import check_causal_lm_step, rope_entry

import autokernel
from autokernel.cache import KernelCache
from autokernel.playbook import cli

transformers = pytest.importorskip("transformers")


@pytest.fixture
def one_candidate(monkeypatch):
    """ak-tune under the interpreter checks one candidate per shape: these tests are about finding, tuning and
    serving a whole model's instances (the search itself is tested elsewhere), and the CI budget is minutes."""
    from autokernel.playbook import tuner

    monkeypatch.setattr(tuner, "INTERPRETER_CANDIDATES", 1)


def _llama(dtype):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype,compiler", [(torch.float32, "aot_eager"), (torch.bfloat16, "inductor")])
def test_llama_rms_norms_found_tuned_and_served(tmp_path, dtype, compiler, one_candidate):
    model = _llama(dtype)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": compiler}
    # 2 layers x (input, post-attention) + the final norm; the three whose input is a residual sum that
    # is carried on are add + RMSNorm.
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    norms = [i for i in report.instances if i.pattern == "rms_norm"]
    assert [i.flags.get("residual", False) for i in norms] == [False, True, True, True, False], str(report)
    # RoPE: one instance per layer, q (4 heads) and k (2 heads, GQA) rotated by one op
    ropes = [i for i in report.instances if i.pattern == "rope"]
    assert [(i.flags["heads"], i.flags["kv_heads"], i.shape) for i in ropes] == [(4, 2, (2, 4, 16, 16))] * 2, \
        str(report)
    assert all(i.status == "miss" for i in report.instances), str(report)
    assert all("modeling_llama.py" in i.source for i in norms + ropes)
    # The lm_head and the loss are one linear_cross_entropy (no cross_entropy instance is left): the logits the
    # model also returns are the op's side output.
    heads = [(i.pattern, i.flags.get("logits_out")) for i in report.instances if "cross_entropy" in i.pattern]
    assert heads == [("linear_cross_entropy", True)], str(report)
    torch.compile(model, backend="autokernel", options=options)(input_ids=ids, labels=ids)
    variants = {(i.pattern, tuple(sorted(i.flags.items())), i.dtype, i.shape) for i in report.instances}
    assert len(KernelCache(tmp_path, device="cpu").wanted()) == len(variants)  # one record per variant and shape
    assert cli.main(["--cache-dir", str(tmp_path), "-q"]) == 0
    torch._dynamo.reset()
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    assert [i.status for i in report.instances] == ["hit"] * len(report.instances), str(report)

    check_causal_lm_step(model, ids, options, grads=dtype == torch.float32)


def test_gpt_neox_partial_rotary_found_and_served(tmp_path):
    """GPT-NeoX rotates 6 of 16 columns per head (q, k and v from one fused projection): the q/k pair is served
    by our op, and the loss and every gradient match eager."""
    cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     vocab_size=256, max_position_embeddings=64, rotary_pct=0.375)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    ropes = [i for i in report.instances if i.pattern == "rope"]
    assert [(i.status, i.flags["rotary_dim"], i.flags["kv_heads"]) for i in ropes] == [("miss", 6, 4)], str(report)
    cache = KernelCache(tmp_path, device="cpu")
    for inst in ropes:
        cache.put_entry(rope_entry(inst, {"fwd_block_h": 2, "bwd_block_h": 4}))
    cache.close()
    torch._dynamo.reset()
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    assert [i.status for i in report.instances if i.pattern == "rope"] == ["hit"], str(report)

    check_causal_lm_step(model, ids, options)


def test_ak_tune_hf_config(tmp_path, capsys, one_candidate):
    """--hf-config: a causal LM from a local config.json (random weights), its misses ranked and tuned."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    cfg.save_pretrained(tmp_path / "cfg")
    args = ["--hf-config", str(tmp_path / "cfg" / "config.json"), "--batch", "1", "--seq", "8",
            "--cache-dir", str(tmp_path / "c"), "-q"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    found = re.search(r"(\d+) pattern instance\(s\), (\d+) to tune", out)
    # 1 layer x 2 norms + the final norm (2 variants: plain and add + RMSNorm), the lm_head + loss
    # (linear_cross_entropy), and whatever else is found
    assert found and int(found[1]) >= 3 and int(found[2]) >= 2, out
    assert len(list(KernelCache(tmp_path / "c", device="cpu").entries())) == int(found[2])
    assert cli.main(["--hf-config", str(tmp_path / "none.json"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--hf-config: no file" in capsys.readouterr().err
