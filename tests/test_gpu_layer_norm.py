"""LayerNorm on the GPU (marker ``gpu``; run on the device machine: ``pytest -m gpu tests/test_gpu_layer_norm.py``):
the kernels at real sizes in every dtype against float64, the backend end to end on CUDA tensors (static
shapes: Inductor launches our kernels inline; dynamic shapes: the opaque op), opcheck of both op flavours."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.layer_norm.kernels import (
    LayerNormConfig,
    default_config,
    layer_norm_bwd,
    layer_norm_fwd,
    layer_norm_reference,
)
from autokernel.lowering.layer_norm.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-5


def _check(rows, hidden, dtype, mode="fp32", config=None, scale=1.0, shift=0.0, weight=True, bias=True):
    g = torch.Generator(device="cuda").manual_seed(rows * 31 + hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=g) * scale + shift).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype) if weight else None
    b = (0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype) if bias else None
    dy = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    cfg = config or default_config(hidden, rows, dtype)
    y, mean, rstd = layer_norm_fwd(x, w, b, EPS, 1, mode, dtype, cfg, True)
    dx, dw, db = layer_norm_bwd(dy, x, w, b, mean, rstd, 1, mode, cfg)
    x64 = x.detach().clone().requires_grad_(True)
    w64 = w.detach().clone().requires_grad_(True) if weight else None
    b64 = b.detach().clone().requires_grad_(True) if bias else None
    ref = layer_norm_reference(x64, w64, b64, EPS, 1, mode)
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    if weight:
        assert_close(dw, w64.grad, dtype, "dw")
    if bias:
        assert_close(db, b64.grad, dtype, "db")
    y2, mean2, rstd2 = layer_norm_fwd(x, w, b, EPS, 1, mode, dtype, cfg, True)
    again = layer_norm_bwd(dy, x, w, b, mean2, rstd2, 1, mode, cfg)
    for first, second in zip((y, dx, dw, db), (y2, *again), strict=True):
        assert (first is None and second is None) or torch.equal(first, second), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fp32", "rounded"])
@pytest.mark.parametrize("rows,hidden", [(8192, 4096), (1, 8192), (2049, 5120), (2048, 16384), (257, 32768),
                                         (3, 4095), (4096, 768)])
def test_kernels_real_sizes(rows, hidden, dtype, mode):
    _check(rows, hidden, dtype, mode)


@pytest.mark.parametrize("config", [
    LayerNormConfig(fwd_num_warps=4, fwd_rows_per_program=4, bwd_num_warps=4, bwd_programs_per_sm=8),
    LayerNormConfig(fwd_num_warps=16, bwd_num_warps=16, bwd_programs_per_sm=1),
    LayerNormConfig(block_n=1024, fwd_rows_per_program=2, num_stages=2),
    LayerNormConfig(block_n=1024, fwd_block_n=2048),
    LayerNormConfig(sum_block_n=16, sum_block_p=512, sum_num_warps=8),
    LayerNormConfig(bwd_programs_per_sm=4, sum_block_n=64, sum_block_p=64, sum_num_warps=4),
])
def test_kernel_configs(config):
    _check(1000, 3000, torch.bfloat16, "fp32", config)
    _check(1000, 3000, torch.float16, "rounded", config, weight=False)


def test_huge_rows_chunked_and_extremes():
    _check(16, 100_000, torch.bfloat16)
    _check(512, 4096, torch.bfloat16, scale=1e4)
    _check(512, 4096, torch.float16, scale=1e-3, bias=False)
    _check(512, 4096, torch.float32, shift=1000.0)
    _check(512, 4096, torch.float32, shift=1000.0, config=LayerNormConfig(block_n=512))


class HandLayerNorm(nn.Module):
    """HF-style hand-written LayerNorm: float32 upcast, biased variance, cast back before the affine."""

    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(h))
        self.bias = nn.Parameter(0.1 * torch.randn(h))

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, keepdim=True, unbiased=False)
        return self.weight * ((h - mean) * torch.rsqrt(var + EPS)).to(dtype) + self.bias


def _layer_norm(h: int) -> nn.Module:
    m = nn.LayerNorm(h, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(1 + 0.1 * torch.randn(h))
        m.bias.copy_(0.1 * torch.randn(h))
    return m


def _fill(model, x, cache_dir: str) -> autokernel.Report:
    """A default-config cache entry for every layer_norm instance explain reports."""
    torch._dynamo.reset()
    report = autokernel.explain(model, x, options={"autokernel.cache_dir": cache_dir})
    cache = KernelCache(cache_dir, device=x.device)
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for inst in report.instances:
        if inst.pattern != "layer_norm":
            continue
        f = inst.flags
        cache.put_entry({
            "version": 1, "pattern": "layer_norm",
            "pattern_key": pattern_key(f["mode"], dts[inst.dtype], dts.get(f["weight"]), dts.get(f["bias"]),
                                       dts[f["out"]]),
            "hidden": inst.shape[-1], "row_bucket": row_bucket(math.prod(inst.shape[:-1])),
            "kernel": {"kind": "family", "config": {}}, "winner": {"fwd": "autokernel", "train": "autokernel"},
            "producer": {"strategy": "test"}, "checks": [], "created": time.time()})
    cache.close()
    return report


def _check_model(compiled, model, x, dtype) -> None:
    """Output and grads of x, weight and bias against the model's own code in float64 (the hand-written
    model's cast back to x's dtype rounded as it does)."""
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.double().requires_grad_(True)
    w64 = model.weight.detach().double().requires_grad_(True)
    b64 = model.bias.detach().double().requires_grad_(True)
    n = F.layer_norm(x64, (x.shape[-1],), None, None, EPS)
    if isinstance(model, HandLayerNorm):
        n = n + (n.to(dtype).double() - n).detach()
    y64 = n * w64 + b64
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert_close(xr.grad, x64.grad, dtype, "dx")
    assert_close(model.weight.grad, w64.grad, dtype, "dw")
    assert_close(model.bias.grad, b64.grad, dtype, "db")
    model.weight.grad = model.bias.grad = None


@pytest.mark.parametrize("factory", [_layer_norm, HandLayerNorm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_on_cuda(factory, dtype, tmp_path):
    torch.manual_seed(0)
    hidden = 2048
    model = factory(hidden).cuda().to(dtype)
    x = torch.randn(4, 512, hidden, device="cuda", dtype=dtype)
    assert [i.status for i in _fill(model, x, str(tmp_path)).instances] == ["miss"]
    torch._dynamo.reset()
    report = autokernel.explain(model, x, options={"autokernel.cache_dir": str(tmp_path)})
    assert [i.status for i in report.instances] == ["hit"], str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    _check_model(compiled, model, x, dtype)


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(getattr(ops, f"layer_norm_train{suffix}"),
                          (x, w, b, EPS, 1, "fp32", torch.bfloat16, ""), **checks)
    torch.library.opcheck(getattr(ops, f"layer_norm{suffix}"),
                          (x.detach(), w.detach(), None, EPS, 1, "rounded", torch.float32, ""), **checks)
    y, mean, rstd = ops.layer_norm_train(x.detach(), w.detach(), b.detach(), EPS, 1, "fp32", torch.bfloat16, "")
    torch.library.opcheck(getattr(ops, f"layer_norm_backward{suffix}"),
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, 1, "fp32",
                           torch.bfloat16, ""), **checks)


@pytest.mark.parametrize("dynamic", [False, True])
@torch._dynamo.config.patch(specialize_float=True)  # else dynamic=True makes eps an input, and we decline
def test_static_shapes_launch_inline_dynamic_shapes_call_the_opaque_op(dynamic, tmp_path):
    """Static shapes: Inductor's own code launches our kernels (no op call left). Dynamic shapes: the
    opaque op, which picks its configuration from each call's shape. Both match float64."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _layer_norm(1024).cuda().to(torch.bfloat16)
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16)
    _fill(model, x, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", dynamic=dynamic,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_model(compiled, model, x, torch.bfloat16))
    code = "\n".join(code)
    assert ("autokernel.layer_norm_train" in code) == dynamic
    assert ("autokernel.layer_norm_backward" in code) == dynamic
    assert ("_layer_norm_fwd_single_kernel" in code) != dynamic
    assert ("_layer_norm_bwd_single_kernel" in code) != dynamic
    assert ("_layer_norm_sum_partials_kernel" in code) != dynamic
    if dynamic:  # a second shape reuses the graph and is served at its own shape
        _check_model(compiled, model, torch.randn(2, 37, 1024, device="cuda", dtype=torch.bfloat16), torch.bfloat16)


def test_ak_tune_on_gpu(tmp_path):
    """A short ak-tune run on the GPU writes an entry that passed every check and raced Inductor."""
    from autokernel.playbook.tuner import TuneRequest, tune

    cache = KernelCache(tmp_path, device=torch.device("cuda"))
    flags = {"mode": "fp32", "weight": "bf16", "bias": "bf16", "out": "bf16"}
    result = tune(TuneRequest("layer_norm", flags, "bf16", [2048, 1024]), cache, torch.device("cuda"), budget_s=30)
    assert result.status in ("written", "inductor wins"), result.detail
    (entry,) = [e for _, e in cache.entries()]
    assert entry["raced"] and entry["checks"] == ["smoke", "shape sweep", "stability", "determinism", "edge cases"]
