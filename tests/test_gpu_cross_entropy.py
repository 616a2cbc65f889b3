"""Cross-entropy GPU checks (marker ``gpu``; run on the device machine: ``pytest -m gpu``): the kernels at real
sizes in every dtype against float64, the backend end to end on CUDA (static shapes: Inductor's code launches
our kernels itself; dynamic shapes: the opaque ops), and opcheck of both op flavours."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.cross_entropy.kernels import (
    CrossEntropyConfig,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_reference,
    default_config,
)
from autokernel.lowering.cross_entropy.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _check(rows, vocab, dtype, reduction, smoothing=0.0, config=None, scale=2.0, upcast=True, ignore=-100):
    g = torch.Generator(device="cuda").manual_seed(rows * 31 + vocab)
    x = (scale * torch.randn(rows, vocab, device="cuda", generator=g)).to(dtype)
    y = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    y[1::7] = ignore
    out_dtype = torch.float32 if upcast else dtype
    cfg = config or default_config(vocab, rows, dtype)
    loss, stats = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, cfg, True)
    loss_only, _ = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, cfg, False)
    dloss = torch.randn(loss.shape, device="cuda", generator=g).to(out_dtype)
    dx = cross_entropy_bwd(dloss, x, y, stats, ignore, smoothing, reduction, cfg)
    x64 = x.double().requires_grad_(True)
    ref = cross_entropy_reference(x64, y, ignore, smoothing, reduction)
    ref.backward(dloss.double())
    assert_close(loss, ref, out_dtype, "loss")
    assert_close(loss_only, ref, out_dtype, "forward-only loss")
    assert_close(dx, x64.grad, dtype, "dlogits")
    loss2, stats2 = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, cfg, True)
    dx2 = cross_entropy_bwd(dloss, x, y, stats2, ignore, smoothing, reduction, cfg)
    assert torch.equal(loss, loss2) and torch.equal(stats, stats2) and torch.equal(dx, dx2), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows,vocab", [(8192, 32000), (1, 128256), (4099, 50257), (3, 257)])
def test_kernels_real_sizes(rows, vocab, dtype, reduction):
    _check(rows, vocab, dtype, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernels_label_smoothing_no_upcast(dtype, reduction):
    _check(2048, 32000, dtype, reduction, smoothing=0.1, upcast=False, ignore=5)


def test_kernels_headline_shape():
    _check(8192, 128256, torch.bfloat16, "mean")


@pytest.mark.parametrize("config", [
    CrossEntropyConfig(fwd_num_warps=4, fwd_block_n=1024, train_num_warps=8, train_block_n=2048, bwd_num_warps=2,
                       bwd_block_n=1024),
    CrossEntropyConfig(fwd_num_warps=32, fwd_block_n=32768, train_num_warps=32, train_block_n=32768,
                       bwd_num_warps=16, bwd_block_n=8192),
])
def test_kernel_configs(config):
    _check(1000, 50000, torch.bfloat16, "sum", smoothing=0.05, config=config)


def test_extremes():
    _check(512, 32000, torch.bfloat16, "mean", scale=1e4)
    _check(512, 32000, torch.float32, "sum", smoothing=0.2, scale=1e4)
    _check(512, 32000, torch.float16, "none", scale=1e-3)


# ---------------------------------------------------------------- the backend on CUDA


def ce_upcast(logits, labels):
    return F.cross_entropy(logits.float(), labels)


def ce_smoothed(logits, labels):
    return F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum")


def hf_causal_lm(logits, labels):
    """transformers >= 4.46 ForCausalLMLoss with num_items_in_batch."""
    vocab = logits.shape[-1]
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    loss = F.cross_entropy(logits.view(-1, vocab), shift_labels.view(-1), ignore_index=-100, reduction="sum")
    return loss / 1000


def _inputs(fn, dtype, vocab=32000, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (4, 256) if fn is hf_causal_lm else (1000,)
    x = (2 * torch.randn(*shape, vocab, device="cuda", generator=g)).to(dtype)
    y = torch.randint(0, vocab, shape, device="cuda", generator=g)
    y.view(-1)[::9] = -100
    return x, y


def _fill(fn, inputs, cache_dir):
    found = [i for i in autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir}).instances
             if i.pattern == "cross_entropy"]
    assert [i.status for i in found] == ["miss"], [(i.status, i.reason) for i in found]
    cache = KernelCache(cache_dir, device=inputs[0].device)
    for inst in found:
        f = inst.flags
        dtype = inputs[0].dtype
        cache.put_entry({
            "version": 1, "pattern": "cross_entropy",
            "pattern_key": pattern_key(f["reduction"], f["ignore_index"], f["label_smoothing"], dtype,
                                       torch.float32 if f["upcast"] else dtype),
            "hidden": inst.shape[-1], "row_bucket": row_bucket(inst.shape[0]),
            "kernel": {"kind": "family", "config": {}},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()})
    cache.close()


def _check_compiled(fn, compiled, inputs, dtype):
    x, y = inputs
    xr = x.clone().requires_grad_(True)
    out = compiled(xr, y)
    dloss = torch.randn_like(out)
    out.backward(dloss)
    x64 = x.double().requires_grad_(True)
    ref = fn(x64, y)
    ref.backward(dloss.double())
    assert out.dtype == fn(x, y).dtype and xr.grad.dtype == dtype
    assert_close(out, ref, out.dtype if out.dtype == torch.float32 else dtype, "loss")
    assert_close(xr.grad, x64.grad, dtype, "dlogits")


@pytest.mark.parametrize("fn", [ce_upcast, ce_smoothed, hf_causal_lm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_shapes_launch_inline(fn, dtype, tmp_path):
    """Static shapes: Inductor's own code launches our kernels (no op call left); both match float64."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    inputs = _inputs(fn, dtype)
    _fill(fn, inputs, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_compiled(fn, compiled, inputs, dtype))
    code = "\n".join(code)
    assert "_cross_entropy_fwd_kernel" in code and "_cross_entropy_bwd_kernel" in code
    assert "autokernel.cross_entropy_train" not in code and "autokernel.cross_entropy_backward" not in code


def test_dynamic_shapes_call_the_opaque_op(tmp_path):
    """Dynamic shapes: the opaque ops, which pick their configuration from each call's shape."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    inputs = _inputs(hf_causal_lm, torch.bfloat16)
    _fill(hf_causal_lm, inputs, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(hf_causal_lm, backend="autokernel", dynamic=True,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_compiled(hf_causal_lm, compiled, inputs, torch.bfloat16))
    code = "\n".join(code)
    assert "autokernel.cross_entropy_train" in code and "autokernel.cross_entropy_backward" in code
    # A second shape reuses the graph and is served at its own shape.
    x, y = _inputs(hf_causal_lm, torch.bfloat16, seed=1)
    _check_compiled(hf_causal_lm, compiled, (x[:3, :100], y[:3, :100]), torch.bfloat16)


def test_forward_only_under_no_grad(tmp_path):
    torch._dynamo.reset()
    inputs = _inputs(ce_upcast, torch.bfloat16)
    _fill(ce_upcast, inputs, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(ce_upcast, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    with torch.no_grad():
        out = compiled(*inputs)
    assert_close(out, ce_upcast(inputs[0].double(), inputs[1]), torch.float32, "loss")


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 1000, (64,), device="cuda")
    y[::5] = -100
    torch.library.opcheck(getattr(ops, f"cross_entropy_train{suffix}"),
                          (x, y, -100, 0.1, "mean", torch.float32, ""), **checks)
    torch.library.opcheck(getattr(ops, f"cross_entropy_train{suffix}"),
                          (x, y, -100, 0.0, "none", torch.bfloat16, ""), **checks)
    torch.library.opcheck(getattr(ops, f"cross_entropy{suffix}"),
                          (x.detach(), y, -100, 0.0, "sum", torch.float32, ""), **checks)
    _loss, stats = getattr(ops, f"cross_entropy_train{suffix}")(x.detach(), y, -100, 0.0, "mean", torch.float32, "")
    torch.library.opcheck(getattr(ops, f"cross_entropy_backward{suffix}"),
                          (torch.randn((), device="cuda"), x.detach(), y, stats, -100, 0.0, "mean", torch.float32,
                           ""), **checks)
