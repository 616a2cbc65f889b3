"""Unmodified transformers models of each family issue 3 names (and more spellings: Qwen3's norms of q and k,
Phi-3's fused gate/up projection, and the families after Phi-3), 2 layers, eager attention, with labels: every
instance found with the expected variant, then served from the cache, and the loss and every parameter gradient equal
to eager's."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from models import check_causal_lm_step, force_sdpa_causal_mask, serve_every_miss

import autokernel

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
              max_position_embeddings=64)
# (pattern, the flag that tells the spelling apart) -> instances in 2 layers. RMSNorm: each layer's input and
# post-attention norms and the final norm; the three whose input is a residual sum carried on are add + RMSNorm.
# The lm_head and the loss make one linear + cross-entropy (the logits the model returns are its side output).
LLAMA_LIKE = {("rms_norm", 0.0, False): 2, ("rms_norm", 0.0, True): 3, ("swiglu", "silu", "separate"): 2,
              ("rope", "half", 16): 2, ("softmax", "softmax"): 2, ("linear_cross_entropy", True): 1}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2), LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None), LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2), LLAMA_LIKE),
    # Gemma: RMSNorm scaled by (1 + w), GeGLU with the tanh gelu
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16),
              {**LLAMA_LIKE, ("rms_norm", 1.0, False): 2, ("rms_norm", 1.0, True): 3, ("rms_norm", 0.0, False): 0,
               ("rms_norm", 0.0, True): 0, ("swiglu", "gelu_tanh", "separate"): 2, ("swiglu", "silu", "separate"): 0}),
    # GPT-NeoX: LayerNorm with bias everywhere (input, post-attention, final, no residual variant), 4 of 16 columns
    # a head rotated, no gated MLP
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25),
                 {("layer_norm",): 5, ("rope", "half", 4): 2, ("softmax", "softmax"): 2,
                  ("linear_cross_entropy", True): 1}),
    # Qwen3: q and k each normalized over the head dim before RoPE (2 more plain RMSNorms a layer)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16),
              {**LLAMA_LIKE, ("rms_norm", 0.0, False): 6}),
    # Phi-3: gate and up from one matmul, split in halves
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                   bos_token_id=1),
             {**LLAMA_LIKE, ("swiglu", "silu", "separate"): 0, ("swiglu", "silu", "gate_up"): 2}),
    # Beyond the list, spellings the families above lack. Gemma 2: norms before and after attention and
    # the MLP, scores soft-capped before the softmax, and the logits soft-capped before the loss (tanh between the
    # lm_head and the loss: cross-entropy alone, not linear + CE, whose math lacks the cap)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16),
               {("rms_norm", 1.0, False): 6, ("rms_norm", 1.0, True): 3, ("swiglu", "gelu_tanh", "separate"): 2,
                ("rope", "half", 16): 2, ("softmax", "softmax"): 2, ("cross_entropy",): 1}),
    # OLMo 2: norms after attention and after the MLP (their outputs added to the residual), and q and k each
    # normalized over all their heads at once
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, eos_token_id=1, pad_token_id=0),
              {**LLAMA_LIKE, ("rms_norm", 0.0, False): 9, ("rms_norm", 0.0, True): 0}),
    # Granite: the residual branches and the embeddings scaled, the logits divided by a scale before the loss
    # (cross-entropy alone)
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(num_key_value_heads=2, logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=2.0),
                {**LLAMA_LIKE, ("linear_cross_entropy", True): 0, ("cross_entropy",): 1}),
    # Cohere: a hand-written LayerNorm without bias, attention and MLP in parallel off one norm, RoPE on
    # interleaved pairs, the logits scaled before the loss (cross-entropy alone)
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, eos_token_id=1, pad_token_id=0,
                                                         bos_token_id=1),
               {("layer_norm",): 3, ("swiglu", "silu", "separate"): 2, ("rope", "interleaved", 16): 2,
                ("softmax", "softmax"): 2, ("cross_entropy",): 1}),
    # StableLM: LayerNorm with bias and a gated MLP, a quarter of each head rotated
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, partial_rotary_factor=0.25),
                 {("layer_norm",): 5, ("swiglu", "silu", "separate"): 2, ("rope", "half", 4): 2,
                  ("softmax", "softmax"): 2, ("linear_cross_entropy", True): 1}),
    # Llama 4 (text): RoPE in the complex form, then q and k each through a weightless RMSNorm (whose x.float()
    # is a no-op cast of the float32 rotation's output), mixture-of-experts MLPs beside a shared gated MLP
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(num_key_value_heads=2, head_dim=16, num_local_experts=2, intermediate_size_mlp=128),
               {("rms_norm", 0.0, False): 6, ("rms_norm", 0.0, True): 3, ("swiglu", "silu", "gate_up"): 2,
                ("swiglu", "silu", "separate"): 2, ("rope", "complex", 16): 2, ("softmax", "softmax"): 2,
                ("linear_cross_entropy", True): 1}),
    # DeepSeek V3: multi-head latent attention (RMSNorms of the q and kv latents), RoPE on interleaved pairs
    # written as halves with one shared key head, mixture-of-experts MLPs after a dense first layer
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         moe_intermediate_size=32, n_group=1, topk_group=1),
                    {("rms_norm", 0.0, False): 6, ("rms_norm", 0.0, True): 3, ("swiglu", "silu", "separate"): 2,
                     ("swiglu", "silu", "gate_up"): 1, ("rope", "deinterleave", 8): 2, ("softmax", "softmax"): 2,
                     ("linear_cross_entropy", True): 1}),
    # GPT-OSS: RoPE on halves with one cos/sin value per pair, attention with sinks (the softmax over the scores and
    # the sink), experts' gate clamped and through sigmoid(alpha * gate) (declined: not a GLU we serve)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
                {("rms_norm", 0.0, False): 2, ("rms_norm", 0.0, True): 3, ("swiglu", "sigmoid", "separate"): 2,
                 ("rope", "half_pairs", 16): 2, ("softmax", "softmax"): 4, ("linear_cross_entropy", True): 1}),
    # Phi: attention and an ungated gelu MLP in parallel off one LayerNorm, half of each head rotated, an lm_head
    # with a bias
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5),
            {("layer_norm",): 3, ("rope", "half", 8): 2, ("softmax", "softmax"): 2, ("linear_cross_entropy", True): 1}),
}
# The spellings a family holds that the backend declines (the math is not a pattern's): never rewritten.
DECLINED = {"gpt_oss": {("swiglu", "sigmoid", "separate")}}


def _spelling(inst: autokernel.InstanceReport) -> tuple:
    f = inst.flags
    return {"rms_norm": lambda: (f["offset"], f.get("residual", False)),
            "swiglu": lambda: (f["act"], f["layout"]),
            "rope": lambda: (f["layout"], f["rotary_dim"]),
            "softmax": lambda: (f["op"],),
            "linear_cross_entropy": lambda: (f["logits_out"],),
            "layer_norm": lambda: (),
            "cross_entropy": lambda: ()}[inst.pattern]()


def _family_model(family: str, attention: str, **overrides) -> tuple[torch.nn.Module, torch.Tensor]:
    """The family's 2-layer model (its config's extras, then ``overrides``) with ``attention``, and its batch."""
    config_cls, model_cls, extra, _ = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**COMMON, **{**extra, **overrides})
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    return model, torch.randint(0, COMMON["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_found_served_and_right(tmp_path, family):
    expected = FAMILIES[family][3]
    model, ids = _family_model(family, "eager")
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}

    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    found = Counter((i.pattern, *_spelling(i)) for i in report.instances)
    assert found == Counter({k: n for k, n in expected.items() if n}), str(report)
    declined = DECLINED.get(family, set())
    served = [i for i in report.instances if (i.pattern, *_spelling(i)) not in declined]
    assert all(i.status == "miss" for i in served), str(report)
    assert all(i.status == "declined" for i in report.instances if i not in served), str(report)
    # The loss, and the experts' gated MLP of a mixture of experts, are transformers' shared code.
    assert all(f"modeling_{family}.py" in i.source or "moe.py" in i.source for i in report.instances
               if i.pattern not in ("linear_cross_entropy", "cross_entropy"))

    torch._dynamo.reset()
    torch.compile(model, backend="autokernel", options=options)(input_ids=ids, labels=ids)  # records the misses
    assert serve_every_miss(tmp_path, "cpu") == len({(i.pattern, i.dtype, i.shape, tuple(sorted(i.flags.items())))
                                                     for i in served})
    torch._dynamo.reset()
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    assert [i.status for i in report.instances] == [
        "declined" if (i.pattern, *_spelling(i)) in declined else "hit" for i in report.instances], str(report)

    check_causal_lm_step(model, ids, options)


NO_SDPA = {"gemma2", "gpt_oss"}  # transformers refuses SDPA for them (soft-capped scores, attention sinks)
# Their attention calls SDPA through the same shared code as Llama's (a test each would add CPU time, not coverage).
SDPA_LIKE_LLAMA = {"olmo2", "granite", "stablelm", "cohere", "phi"}


@pytest.mark.parametrize("family, window", [*((f, None) for f in FAMILIES if f not in NO_SDPA | SDPA_LIKE_LLAMA),
                                            ("mistral", 8)])
def test_family_with_sdpa_gets_is_causal(tmp_path, monkeypatch, family, window):
    """The same models with SDPA attention, as transformers builds them under torch.compile before torch 2.14 (its
    causal mask never skipped while Dynamo traces, so each layer's SDPA call gets it): both layers' masks are
    rewritten to is_causal=True, and the step equals eager's. A Mistral whose sliding window (8) is shorter than the
    sequence (16) has a mask that is not the causal one: declined, the step still eager's."""
    force_sdpa_causal_mask(monkeypatch)
    model, ids = _family_model(family, "sdpa", **({"sliding_window": window} if window else {}))
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    report = autokernel.explain(model, input_ids=ids, labels=ids, options=options)
    masks = [(i.status, i.flags.get("mask", "")) for i in report.instances if i.pattern == "attention_mask"]
    assert masks == ([("declined", "")] if window else [("rewritten", "causal")]) * 2, str(report)
    assert all(f"{family}.py" in i.source or "sdpa_attention.py" in i.source
               for i in report.instances if i.pattern == "attention_mask"), str(report)
    check_causal_lm_step(model, ids, options)
