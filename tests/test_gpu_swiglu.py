"""GPU checks of the gated MLP activation (marker ``gpu``; run on the device machine: ``pytest -m gpu``): the
kernels at real sizes in every dtype against float64, every ak-tune candidate through the checks, the backend
end to end on CUDA (static shapes: Inductor's code launches our kernels; dynamic shapes: the opaque ops), and
opcheck of both flavours of the ops."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.swiglu.kernels import (
    ACTS,
    SwigluConfig,
    default_config,
    swiglu_bwd,
    swiglu_fwd,
    swiglu_reference,
)
from autokernel.lowering.swiglu.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _check(rows, width, dtype, act, layout, config=None, scale=1.0, noncontiguous=False):
    g = torch.Generator(device="cuda").manual_seed(rows * 31 + width)
    pad = 8 if noncontiguous else 0
    cols = width if layout == "separate" else 2 * width
    x = (torch.randn(rows, cols + pad, device="cuda", generator=g) * scale).to(dtype)[:, :cols]
    up = torch.randn(rows, cols + pad, device="cuda", generator=g).to(dtype)[:, :cols] if layout == "separate" else None
    dy = torch.randn(rows, width, device="cuda", generator=g).to(dtype)
    cfg = config or default_config(width, rows, dtype)
    y = swiglu_fwd(x, up, act, layout, cfg)
    dx, dup = swiglu_bwd(dy, x, up, act, layout, cfg)
    x64 = x.detach().clone().requires_grad_(True)
    u64 = up.detach().clone().requires_grad_(True) if up is not None else None
    ref = swiglu_reference(x64, u64, act, layout)
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    if up is not None:
        assert_close(dup, u64.grad, dtype, "dup")
    dx2, dup2 = swiglu_bwd(dy, x, up, act, layout, cfg)
    assert torch.equal(y, swiglu_fwd(x, up, act, layout, cfg)) and torch.equal(dx, dx2), "not deterministic"
    assert up is None or torch.equal(dup, dup2), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["separate", "gate_up"])
@pytest.mark.parametrize("rows,width", [(4096, 8192), (1, 14336), (2049, 11008), (3, 4095)])
def test_kernels_real_sizes(rows, width, layout, act, dtype):
    _check(rows, width, dtype, act, layout)


def test_headline_shape_and_layouts():
    _check(8192, 14336, torch.bfloat16, "silu", "separate")
    _check(8192, 14336, torch.bfloat16, "silu", "gate_up")
    _check(1000, 3000, torch.bfloat16, "gelu", "up_gate", noncontiguous=True)
    _check(1000, 3000, torch.float16, "gelu_tanh", "separate", noncontiguous=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1e4, 1e-3])
@pytest.mark.parametrize("act", ACTS)
def test_extreme_gates(act, scale, dtype):
    _check(512, 4096, dtype, act, "separate", scale=scale)


@pytest.mark.parametrize("layout", ["separate", "gate_up"])
def test_every_tuner_candidate_passes_the_checks(layout):
    from autokernel.lowering.swiglu.problem import SwigluProblem
    from autokernel.playbook.checks import run_checks

    problem = SwigluProblem({"act": "silu", "layout": layout}, "bf16", [1024, 5000], "cuda")
    for phase, candidate in problem.candidates():
        assert run_checks(problem, candidate, max_rows=1024), (phase, candidate)


@pytest.mark.parametrize("config", [SwigluConfig(fwd_block=16, fwd_num_warps=1, bwd_block=16, bwd_num_warps=1),
                                    SwigluConfig(fwd_block=8192, fwd_num_warps=16, bwd_block=8192,
                                                 bwd_num_warps=32)])
def test_extreme_configs(config):
    _check(300, 3000, torch.bfloat16, "silu", "gate_up", config)


# ---------------------------------------------------------------- the backend on CUDA


class LlamaMLPAct(torch.nn.Module):
    """A Llama MLP (Phi-3's one ``gate_up`` projection, chunked, or Llama's two): the matmuls stay Inductor's."""

    def __init__(self, h: int, inter: int, fused: bool):
        super().__init__()
        self.fused, self.inter = fused, inter
        if fused:
            self.gate_up = torch.nn.Linear(h, 2 * inter, bias=False)
        else:
            self.gate = torch.nn.Linear(h, inter, bias=False)
            self.up = torch.nn.Linear(h, inter, bias=False)
        self.down = torch.nn.Linear(inter, h, bias=False)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)


def _fill(model, x, cache_dir):
    report = autokernel.explain(model, x, options={"autokernel.cache_dir": cache_dir})
    found = [i for i in report.instances if i.pattern == "swiglu"]
    assert [i.status for i in found] == ["miss"], str(report)
    cache = KernelCache(cache_dir, device=x.device)
    for inst in found:
        cache.put_entry({
            "version": 1, "pattern": "swiglu",
            "pattern_key": pattern_key(inst.flags["act"], inst.flags["layout"], x.dtype),
            "hidden": inst.shape[-1], "row_bucket": row_bucket(math.prod(inst.shape[:-1])),
            "kernel": {"kind": "family", "config": {}},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()})
    cache.close()
    return found[0]


def _check_model(compiled, model, x):
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = LlamaMLPAct(model.down.out_features, model.inter, model.fused).cuda().double()
    ref.load_state_dict(model.state_dict())
    x64 = x.double().requires_grad_(True)
    y64 = ref(x64)
    y64.backward(dy.double())
    assert_close(y, y64, x.dtype, "y")
    assert_close(xr.grad, x64.grad, x.dtype, "dx")
    for (name, p), p64 in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, p64.grad, x.dtype, f"d{name}")
        p.grad = None


@pytest.mark.parametrize("fused", [True, False], ids=["chunked", "two_tensors"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_static_shapes_launch_inline_dynamic_shapes_call_the_opaque_op(dynamic, fused, tmp_path):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaMLPAct(512, 1024, fused).cuda().to(torch.bfloat16)
    x = torch.randn(4, 100, 512, device="cuda", dtype=torch.bfloat16)
    inst = _fill(model, x, str(tmp_path))
    assert inst.flags == {"act": "silu", "layout": "gate_up" if fused else "separate"}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", dynamic=dynamic,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_model(compiled, model, x))
    code = "\n".join(code)
    assert ("autokernel.swiglu_train" in code) == dynamic
    assert ("autokernel.swiglu_backward" in code) == dynamic
    assert ("_swiglu_fwd_kernel" in code) != dynamic
    assert ("_swiglu_bwd_kernel" in code) != dynamic
    if fused and not dynamic:
        # The gradient of the chunked tensor comes whole out of our backward: no concatenation kernel.
        assert "aten.cat" not in code and "fused_cat" not in code
    if dynamic:  # a second shape reuses the graph and is served at its own shape
        _check_model(compiled, model, torch.randn(2, 37, 512, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_no_grad(dtype, tmp_path):
    torch._dynamo.reset()
    model = LlamaMLPAct(256, 512, True).cuda().to(dtype)
    x = torch.randn(3, 64, 256, device="cuda", dtype=dtype)
    _fill(model, x, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    with torch.no_grad():
        y = compiled(x)
        ref = LlamaMLPAct(256, 512, True).cuda().double()
        ref.load_state_dict(model.state_dict())
        assert_close(y, ref(x.double()), dtype, "y")


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    g = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(64, 2000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(getattr(ops, f"swiglu_train{suffix}"), (g, u, "silu", "separate", ""), **checks)
    torch.library.opcheck(getattr(ops, f"swiglu_train{suffix}"), (x, None, "gelu_tanh", "gate_up", ""), **checks)
    torch.library.opcheck(getattr(ops, f"swiglu{suffix}"), (x.detach(), None, "gelu", "up_gate", ""), **checks)
    torch.library.opcheck(getattr(ops, f"swiglu_backward{suffix}"),
                          (dy, g.detach(), u.detach(), "silu", "separate", ""), **checks)
    torch.library.opcheck(getattr(ops, f"swiglu_backward{suffix}"),
                          (dy, x.detach(), None, "silu", "gate_up", ""), **checks)
