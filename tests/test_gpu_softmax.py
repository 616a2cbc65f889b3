"""GPU checks of the softmax family (marker ``gpu``; run on the device machine: ``pytest -m gpu``): the kernels at
real sizes in every dtype against float64, the backend end to end on CUDA tensors (static shapes: Inductor's code
launches our kernels itself; dynamic shapes: the opaque op), and opcheck of both op flavours."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.softmax.kernels import (
    SoftmaxConfig,
    default_config,
    softmax_bwd,
    softmax_fwd,
    softmax_reference,
)
from autokernel.lowering.softmax.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _coarsest(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=[torch.float32, torch.float16, torch.bfloat16].index)


def _check(rows, hidden, dtype, log, config=None, out_dtype=None, scale=1.0, mask=False):
    out_dtype = out_dtype or dtype
    g = torch.Generator(device="cuda").manual_seed(rows * 31 + hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=g) * scale).to(dtype)
    if mask:  # causal-style: row r keeps columns <= r (mod hidden), the rest is -inf
        cols = torch.arange(hidden, device="cuda")
        x = x.masked_fill(cols[None, :] > (torch.arange(rows, device="cuda") % hidden)[:, None], float("-inf"))
    dy = torch.randn(rows, hidden, device="cuda", generator=g).to(out_dtype)
    cfg = config or default_config(hidden, rows, dtype)
    y = softmax_fwd(x, log, out_dtype, cfg)
    dx = softmax_bwd(dy, y, log, dtype, cfg)
    x64 = x.detach().clone().requires_grad_(True)
    ref = softmax_reference(x64, log, out_dtype)
    ref.backward(dy.double())
    tol = _coarsest(dtype, out_dtype)
    assert_close(y, ref, tol, "y")
    assert_close(dx, x64.grad, tol, "dx")
    y2 = softmax_fwd(x, log, out_dtype, cfg)
    dx2 = softmax_bwd(dy, y2, log, dtype, cfg)
    assert torch.equal(y, y2) and torch.equal(dx, dx2), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("rows,hidden", [(8192, 8192), (4096, 256), (1, 8192), (2049, 5000), (257, 32768),
                                         (64, 100_000), (3, 4095)])
def test_kernels_real_sizes(rows, hidden, dtype, log):
    _check(rows, hidden, dtype, log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("config", [
    SoftmaxConfig(fwd_num_warps=4, fwd_rows_per_program=4, bwd_num_warps=4, bwd_rows_per_program=2),
    SoftmaxConfig(fwd_num_warps=32, bwd_num_warps=32),
    SoftmaxConfig(fwd_block_n=1024, bwd_block_n=512, fwd_rows_per_program=2, num_stages=3),
])
def test_kernel_configs(config, log):
    _check(1000, 3000, torch.bfloat16, log, config)


def test_out_dtypes_masks_and_extremes():
    _check(4096, 4096, torch.bfloat16, False, out_dtype=torch.float32)  # softmax(x, dtype=float32)
    _check(4096, 4096, torch.float32, False, out_dtype=torch.bfloat16)
    _check(4096, 2048, torch.float16, True, out_dtype=torch.float32)
    _check(2048, 2048, torch.bfloat16, False, mask=True)
    _check(2048, 40_000, torch.bfloat16, False, mask=True)  # chunked online softmax over masked lanes
    _check(512, 4096, torch.bfloat16, False, scale=1e4)
    _check(512, 4096, torch.float16, True, scale=1e-3)


class HFAttentionProbs(torch.nn.Module):
    """transformers' eager attention around the softmax: scale, mask, softmax in float32, back to q's dtype."""

    def forward(self, scores, mask):
        return F.softmax(scores * 0.125 + mask, dim=-1, dtype=torch.float32).to(scores.dtype)


class LogSoftmax(torch.nn.Module):
    def forward(self, scores, mask):
        return F.log_softmax(scores, -1)


def _fill(fn, inputs, cache_dir):
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    found = [i for i in report.instances if i.pattern == "softmax"]
    assert [i.status for i in found] == ["miss"], str(report)
    cache = KernelCache(cache_dir, device=inputs[0].device)
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for inst in found:
        shape = inputs[0].shape
        cache.put_entry({
            "version": 1, "pattern": "softmax",
            "pattern_key": pattern_key(inst.flags["op"] == "log_softmax", dts[inst.dtype], dts[inst.flags["out"]]),
            "hidden": shape[-1], "row_bucket": row_bucket(inputs[0].numel() // shape[-1]),
            "kernel": {"kind": "family", "config": {}}, "winner": {"fwd": "autokernel", "train": "autokernel"},
            "producer": {"strategy": "test"}, "checks": [], "created": time.time()})
    cache.close()


def _check_module(module, compiled, scores, mask):
    s = scores.clone().requires_grad_(True)
    y = compiled(s, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    s64 = scores.double().requires_grad_(True)
    if isinstance(module, HFAttentionProbs):
        y64 = torch.softmax(s64 * 0.125 + mask.double(), -1)
    else:
        y64 = torch.log_softmax(s64, -1)
    y64.backward(dy.double())
    assert_close(y, y64, scores.dtype, "y")
    assert_close(s.grad, s64.grad, scores.dtype, "dx")


def _inputs(dtype, shape=(2, 8, 256, 256)):
    scores = torch.randn(shape, device="cuda", dtype=dtype) * 4
    mask = torch.full(shape[-2:], float("-inf"), device="cuda").triu(1).to(dtype)  # causal
    return scores, mask


@pytest.mark.parametrize("module", [HFAttentionProbs, LogSoftmax])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_on_cuda(module, dtype, tmp_path):
    torch._dynamo.reset()
    model = module()
    scores, mask = _inputs(dtype)
    _fill(model, (scores, mask), str(tmp_path))
    report = autokernel.explain(model, scores, mask, options={"autokernel.cache_dir": str(tmp_path)})
    assert [i.status for i in report.instances if i.pattern == "softmax"] == ["hit"], str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    _check_module(model, compiled, scores, mask)


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_shapes_launch_inline_dynamic_shapes_call_the_opaque_op(dynamic, tmp_path):
    """Static shapes: Inductor's own code launches our kernels (no op call left). Dynamic shapes: the opaque
    op, which picks its configuration from each call's shape. Both match float64."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = HFAttentionProbs()
    scores, mask = _inputs(torch.bfloat16, (2, 4, 128, 128))
    _fill(model, (scores, mask), str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", dynamic=dynamic,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_module(model, compiled, scores, mask))
    code = "\n".join(code)
    assert ("autokernel.softmax_train" in code) == dynamic
    assert ("autokernel.softmax_backward" in code) == dynamic
    assert ("_softmax_fwd_single_kernel" in code) != dynamic
    assert ("_softmax_bwd_single_kernel" in code) != dynamic
    if dynamic:  # a second shape reuses the graph and is served at its own shape
        _check_module(model, compiled, *_inputs(torch.bfloat16, (1, 4, 128, 128)))


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.softmax(x.detach().float(), -1).to(torch.bfloat16)
    dy = torch.randn_like(y)
    torch.library.opcheck(getattr(ops, f"softmax_train{suffix}"), (x, False, torch.bfloat16, ""), **checks)
    torch.library.opcheck(getattr(ops, f"softmax_train{suffix}"), (x, True, torch.float32, ""), **checks)
    torch.library.opcheck(getattr(ops, f"softmax{suffix}"), (x.detach(), False, torch.bfloat16, ""), **checks)
    torch.library.opcheck(getattr(ops, f"softmax_backward{suffix}"), (dy, y, False, torch.bfloat16, ""), **checks)
