"""GPU checks (marker ``gpu``; run on the device machine: ``pytest -m gpu``): the kernels at real sizes in
every dtype against float64, the CUDA spellings (``F.rms_norm`` may reach aten as ``_fused_rms_norm``), and
the backend end to end on CUDA tensors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.rms_norm.kernels import (
    RmsNormConfig,
    default_config,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check(rows, hidden, dtype, mode, offset, config=None, scale=1.0, weight=True):
    g = torch.Generator(device="cuda").manual_seed(rows * 31 + hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=g) * scale).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype) if weight else None
    dy = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    cfg = config or default_config(hidden, rows, dtype)
    y, rstd = rms_norm_fwd(x, w, 1e-6, offset, mode, dtype, cfg, True)
    dx, dw = rms_norm_bwd(dy, x, w, rstd, offset, mode, cfg)
    x64 = x.detach().clone().requires_grad_(True)
    w64 = w.detach().clone().requires_grad_(True) if w is not None else None
    ref = rms_norm_reference(x64, w64, 1e-6, offset, mode, dtype)
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    if w is not None:
        assert_close(dw, w64.grad, dtype, "dw")
    y2, rstd2 = rms_norm_fwd(x, w, 1e-6, offset, mode, dtype, cfg, True)
    dx2, dw2 = rms_norm_bwd(dy, x, w, rstd2, offset, mode, cfg)
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and (w is None or torch.equal(dw, dw2)), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("rows,hidden", [(8192, 4096), (1, 8192), (2049, 5120), (257, 32768), (3, 4095)])
def test_kernels_real_sizes(rows, hidden, dtype, mode, offset):
    _check(rows, hidden, dtype, mode, offset)


@pytest.mark.parametrize("config", [
    RmsNormConfig(fwd_num_warps=4, fwd_rows_per_program=4, bwd_num_warps=4, bwd_programs_per_sm=8),
    RmsNormConfig(fwd_num_warps=16, bwd_num_warps=16, bwd_programs_per_sm=1),
    RmsNormConfig(block_n=1024, fwd_rows_per_program=2),
    RmsNormConfig(block_n=1024, fwd_block_n=2048),
    RmsNormConfig(bwd_split_n=1024, bwd_num_warps=4),
    RmsNormConfig(bwd_split_n=512, bwd_num_warps=4, bwd_programs_per_sm=1),
])
def test_kernel_configs(config):
    _check(1000, 3000, torch.bfloat16, "llama", 0.0, config)


def test_huge_rows_chunked_and_extremes():
    _check(16, 100_000, torch.bfloat16, "llama", 0.0)
    _check(333, 32768, torch.bfloat16, "llama", 0.0, RmsNormConfig(bwd_split_n=1024, bwd_num_warps=4))
    _check(16, 100_000, torch.bfloat16, "gemma", 1.0, RmsNormConfig(bwd_split_n=2048, bwd_num_warps=8))
    _check(512, 4096, torch.bfloat16, "llama", 0.0, scale=1e4)
    _check(512, 4096, torch.float16, "gemma", 0.0, scale=1e-3, weight=False)


class HF(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(h))

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dt)


class Functional(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(h))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


def _fill(fn, x, cache_dir):
    report = autokernel.explain(fn, x, options={"autokernel.cache_dir": cache_dir})
    cache = KernelCache(cache_dir, device=x.device)
    for inst in report.instances:
        assert inst.status == "miss", inst
        f = inst.flags
        dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        rows = x.numel() // x.shape[-1]
        cache.put_entry({
            "version": 1, "pattern": "rms_norm",
            "pattern_key": pattern_key(f["mode"], f["offset"], x.dtype, dts.get(f["weight"]), dts[f["out"]]),
            "hidden": x.shape[-1], "row_bucket": row_bucket(rows), "kernel": {"kind": "family", "config": {}},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()})
    return report


@pytest.mark.parametrize("module", [HF, Functional])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_on_cuda(module, dtype, tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden = 2048
    model = module(hidden).cuda().to(dtype)
    x = torch.randn(4, 512, hidden, device="cuda", dtype=dtype)
    report = _fill(model, x, str(tmp_path))
    assert len(report.instances) == 1
    report = autokernel.explain(model, x, options={"autokernel.cache_dir": str(tmp_path)})
    assert [i.status for i in report.instances] == ["hit"], str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = module(hidden).cuda().double()
    ref.load_state_dict(model.state_dict())
    x64 = x.double().requires_grad_(True)
    if module is HF:
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        y64 = ref.weight * h.to(dtype).double()
    else:
        y64 = ref(x64)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert_close(xr.grad, x64.grad, dtype, "dx")
    assert_close(model.weight.grad, ref.weight.grad, dtype, "dw")


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(getattr(ops, f"rms_norm_train{suffix}"), (x, w, 1e-6, 0.0, "llama", torch.bfloat16, ""),
                          **checks)
    torch.library.opcheck(getattr(ops, f"rms_norm{suffix}"), (x.detach(), w.detach(), 1e-6, 1.0, "gemma",
                                                              torch.float32, ""), **checks)


@pytest.mark.parametrize("dynamic", [False, True])
@torch._dynamo.config.patch(specialize_float=True)  # else dynamic=True makes eps an input, and we decline
def test_static_shapes_launch_inline_dynamic_shapes_call_the_opaque_op(dynamic, tmp_path):
    """Static shapes: Inductor's own code launches our kernel (no op call left). Dynamic shapes: the
    opaque op, which picks its configuration from each call's shape. Both match float64."""
    from models import HFLlama, check_hf_llama
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = HFLlama(1024).cuda().to(torch.bfloat16)
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16)
    _fill(model, x, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", dynamic=dynamic,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: check_hf_llama(compiled, model, x))
    code = "\n".join(code)
    assert ("autokernel.rms_norm_train" in code) == dynamic
    assert ("autokernel.rms_norm_backward" in code) == dynamic
    assert ("_rms_norm_fwd_single_kernel" in code) != dynamic
    assert ("_rms_norm_bwd_single_kernel" in code) != dynamic
    if dynamic:  # a second shape reuses the graph and is served at its own shape
        check_hf_llama(compiled, model, torch.randn(2, 37, 1024, device="cuda", dtype=torch.bfloat16))


def test_a_kernel_that_does_not_build_costs_the_kernel_not_the_model(tmp_path, caplog):
    """An inline op's kernel is built with the graph: a source entry whose kernel does not compile makes
    the backend compile the graph again without our ops."""
    import logging

    from models import AGENT_SOURCE, HFLlama, check_hf_llama

    torch._dynamo.reset()
    hidden, rows = 512, 64
    model = HFLlama(hidden).cuda().to(torch.bfloat16)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    broken = AGENT_SOURCE.replace("    cols = tl.arange(0, BLOCK_N)", "    tl.static_assert(BLOCK_N < 0)\n"
                                  "    cols = tl.arange(0, BLOCK_N)", 1)
    assert broken != AGENT_SOURCE
    KernelCache(tmp_path, device=x.device).put_entry({
        "version": 1, "pattern": "rms_norm",
        "pattern_key": pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        "hidden": hidden, "row_bucket": row_bucket(rows),
        "kernel": {"kind": "source", "source": broken, "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
        "checks": [], "created": time.time()})
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        check_hf_llama(torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)}),
                       model, x)
    assert "compiling it without them" in caplog.text


def test_source_entry_on_cuda(tmp_path):
    """A kernel-source entry (the agent's format) compiles for the GPU and is served."""
    from models import AGENT_SOURCE, HFLlama, check_hf_llama

    torch._dynamo.reset()
    hidden, rows = 1000, 300
    model = HFLlama(hidden).cuda().to(torch.bfloat16)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    KernelCache(tmp_path, device=x.device).put_entry({
        "version": 1, "pattern": "rms_norm",
        "pattern_key": pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        "hidden": hidden, "row_bucket": row_bucket(rows),
        "kernel": {"kind": "source", "source": AGENT_SOURCE, "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
        "checks": [], "created": time.time()})
    check_hf_llama(torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)}),
                   model, x)
    assert len(list((tmp_path / "sources").glob("ak_*.py"))) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (333, 1000), (4096, 4096), (64, 40000)])
def test_add_rms_norm_kernels_real_sizes(rows, hidden, dtype):
    from autokernel.lowering.rms_norm.problem import RmsNormProblem

    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    problem = RmsNormProblem({"mode": "llama", "residual": True}, name, [rows, hidden], "cuda")
    case = problem.case(rows, hidden, seed=rows)
    candidates = [c for _, c in problem.candidates()]
    wide = [c for c in candidates if c.get("block_n")][:1] + [c for c in candidates if c.get("bwd_split_n")][:1]
    for candidate in candidates[:1] + wide:
        out = problem.run(candidate, case)
        ref = problem.reference(case)
        for k in out:
            assert_close(out[k], ref[k], problem.tolerance_dtype(k), k)
        # On the GPU the kernel rounds the sum as eager's add does: bit for bit.
        assert torch.equal(out["h"], case.x + case.residual)
        again = problem.run(candidate, case)
        assert all(torch.equal(out[k], again[k]) for k in out), "not deterministic"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_end_to_end_inline(dtype, tmp_path):
    from test_add_rms_norm import PreNormBlock, _entry
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden, rows = 40, 6  # _entry's hidden
    block = PreNormBlock(hidden).cuda().to(dtype)
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    r = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    KernelCache(tmp_path, device=x.device).put_entry(_entry(rows, dtype))
    compiled = torch.compile(block, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()

    def step():
        out = compiled(xr, rr)
        out.backward(g)
        return out

    g = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    out, code = run_and_get_code(step)
    code = "\n".join(code)
    assert "_rms_norm_fwd_single_kernel" in code and "_rms_norm_bwd_single_kernel" in code
    ref = PreNormBlock(hidden).cuda().double()
    ref.load_state_dict(block.state_dict())
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    ref(x64, r64).backward(g.double())
    assert_close(out, ref(x64.detach(), r64.detach()), dtype, "out")
    assert_close(xr.grad, x64.grad, dtype, "dx")
    assert_close(rr.grad, r64.grad, dtype, "dresidual")
    assert_close(block.norm.weight.grad, ref.norm.weight.grad, dtype, "dw")
