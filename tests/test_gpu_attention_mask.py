"""GPU checks of the attention-mask rewrite (marker ``gpu``; run on the device machine: ``pytest -m gpu``): on CUDA
a rewritten SDPA call runs the flash/cuDNN causal kernels, which the CPU tests never reach. The masks of
``test_attention_mask.py`` compiled by Inductor against float64 eager SDPA with the explicit mask, every dtype;
then a 2-layer Llama with SDPA attention and its mask forced (as transformers builds it under torch.compile with
torch < 2.14) against eager transformers, which passes is_causal=True itself."""

from __future__ import annotations

import pytest
import torch
from models import force_sdpa_causal_mask, mask_rewrite_step, sdpa_llama
from test_attention_mask import causal_float_min, causal_hf

import autokernel
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fn", [causal_hf, causal_float_min])
@pytest.mark.parametrize("seq", [2, 333, 2048])
def test_rewritten_causal_sdpa_against_float64(tmp_path, fn, dtype, seq) -> None:
    """(At one key dq is exactly zero in float64 and ~1e-6 from the GPU kernels: no relative bound holds against a
    zero reference, so the shortest case is two keys.)"""
    g = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v = (torch.randn(2, 8, seq, 128, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    options = {"autokernel.cache_dir": str(tmp_path)}
    torch._dynamo.reset()
    report = autokernel.explain(fn, q, k, v, options=options)
    assert [(i.status, i.flags.get("mask")) for i in report.instances] == [("rewritten", "causal")], report
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = torch.compile(fn, backend="autokernel", options=options)(*leaves)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = fn(*ref)
    expected.backward(dy.double())
    assert_close(out, expected, dtype, "out")
    for name, a, b in zip("qkv", leaves, ref, strict=True):
        assert_close(a.grad, b.grad, dtype, f"d{name}")


def test_llama_with_its_causal_mask_compiles_to_is_causal_on_cuda(monkeypatch, tmp_path) -> None:
    pytest.importorskip("transformers")
    force_sdpa_causal_mask(monkeypatch)
    model = sdpa_llama(hidden=256, vocab=512, max_positions=1024).cuda()
    ids = torch.randint(0, 512, (2, 333), device="cuda")
    masks, (loss, grads), (expected, ref) = mask_rewrite_step(model, ids, {"autokernel.cache_dir": str(tmp_path)})
    assert [(i.status, i.flags.get("mask")) for i in masks] == [("rewritten", "causal")] * 2, masks
    # A whole model in float32, eager against Inductor's fusions: rounding order only, far under 1e-4.
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-3, atol=1e-4 * float(ref[name].abs().max()), msg=name)
