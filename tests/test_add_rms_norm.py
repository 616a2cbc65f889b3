"""Add + RMSNorm (``h = x + residual; y = rmsnorm(h)`` with ``h`` read again): found, served by one op
that also returns ``h``, equal to float64 forward and backward; the kernels on awkward shapes."""

from __future__ import annotations

import time

import pytest
import torch
from models import HFLlama
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.rms_norm.kernels import (
    RmsNormConfig,
    add_rms_norm_fwd,
    default_config,
    rms_norm_bwd,
)
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.lowering.rms_norm.problem import RmsNormProblem
from autokernel.playbook.tolerances import assert_close

H = 40


class PreNormBlock(nn.Module):
    """A pre-norm residual block's edge: the sum is normalized and also carried on."""

    def __init__(self, h: int):
        super().__init__()
        self.norm = HFLlama(h)
        self.proj = nn.Linear(h, h, bias=False)

    def forward(self, x, residual):
        h = x + residual
        return self.proj(self.norm(h)) + h


class SumOnlyNormed(PreNormBlock):
    def forward(self, x, residual):
        return self.proj(self.norm(x + residual))


def _entry(rows: int, dtype: torch.dtype, residual: bool = True) -> dict:
    # float32 models have no rounding cast between normalize and weight: the matcher calls that "gemma".
    mode = "gemma" if dtype == torch.float32 else "llama"
    return {"version": 1, "pattern": "rms_norm", "pattern_key": pattern_key(mode, 0.0, dtype, dtype, dtype, residual),
            "hidden": H, "row_bucket": row_bucket(rows), "kernel": {"kind": "family", "config": {}},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()}


def _inputs(dtype, rows=6):
    torch.manual_seed(0)
    block = PreNormBlock(H).to(dtype)
    return block, torch.randn(rows, H, dtype=dtype), torch.randn(rows, H, dtype=dtype)


def test_explain_finds_the_residual_add_only_when_the_sum_is_read_again():
    block, x, r = _inputs(torch.float32)
    inst, = autokernel.explain(block, x, r).instances
    assert inst.flags.get("residual") is True and inst.status == "miss"
    only = SumOnlyNormed(H)
    inst, = autokernel.explain(only, x, r).instances
    assert "residual" not in inst.flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_block_matches_float64_forward_and_backward(dtype, tmp_path):
    block, x, r = _inputs(dtype)
    KernelCache(tmp_path, device="cpu").put_entry(_entry(6, dtype))
    graphs = []

    def spy(gm, example_inputs, **kw):
        out = autokernel.backend(gm, example_inputs, **kw)
        graphs.append(str(gm.graph))
        return out

    compiled = torch.compile(block, backend=spy, options={"autokernel.cache_dir": str(tmp_path),
                                                           "autokernel.compiler": "aot_eager"})
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    out = compiled(xr, rr)
    g = torch.randn_like(out)
    out.backward(g)
    assert "autokernel.add_rms_norm_train.default" in graphs[0] and "aten.add" not in graphs[0].split("proj")[0]
    ref = PreNormBlock(H).double()
    ref.load_state_dict(block.state_dict())
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    out64 = ref(x64, r64)
    out64.backward(g.double())
    assert_close(out, out64, dtype, "out")
    assert_close(xr.grad, x64.grad, dtype, "dx")
    assert_close(rr.grad, r64.grad, dtype, "dresidual")
    assert_close(block.norm.weight.grad, ref.norm.weight.grad, dtype, "dw")
    with torch.no_grad():
        assert_close(compiled(x, r), out64, dtype, "no_grad out")
    assert any("autokernel.add_rms_norm.default" in gr for gr in graphs[1:])


@pytest.mark.parametrize("rows,hidden,chunks", [(1, 40, {}), (7, 33, {}), (5, 300, {"block_n": 64, "fwd_block_n": 64}),
                                               (130, 512, {}), (9, 300, {"bwd_split_n": 128})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_float64(rows, hidden, chunks, dtype):
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    problem = RmsNormProblem({"mode": "llama", "residual": True}, name, [rows, hidden], "cpu")
    case = problem.case(rows, hidden, scale=1.0, seed=rows)
    config = {**problem.default_candidate(), **chunks}
    out = problem.run(config, case)
    ref = problem.reference(case)
    assert set(out) == set(ref) == {"y", "h", "dx", "dresidual", "dw"}
    for name in out:
        assert_close(out[name], ref[name], problem.tolerance_dtype(name), name)
    again = problem.run(config, case)
    assert all(torch.equal(out[n], again[n]) for n in out), "not deterministic"


def test_bad_residual_is_refused_with_its_name():
    x = torch.randn(3, 8)
    cfg = default_config(8, 3, x.dtype)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        add_rms_norm_fwd(x, torch.randn(3, 4), None, 1e-6, 0.0, "llama", x.dtype, cfg, True)
    with pytest.raises(ValueError, match="dh shape"):
        rms_norm_bwd(x, x, None, torch.ones(3), 0.0, "llama", RmsNormConfig(), dh=torch.randn(2, 8))


def test_ak_tune_fills_an_add_rms_norm_entry_that_then_hits(tmp_path):
    from autokernel.playbook import cli

    block, x, r = _inputs(torch.bfloat16, rows=4)
    options = {"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}
    torch.compile(block, backend="autokernel", options=options)(x, r)  # records the miss
    (_, want), = KernelCache(tmp_path, device="cpu").wanted()
    assert want["flags"]["residual"] is True
    assert cli.main(["--cache-dir", str(tmp_path), "-q"]) == 0
    entry, = (e for _, e in KernelCache(tmp_path, device="cpu").entries())
    assert entry["pattern_key"].endswith(",residual=1")
    torch._dynamo.reset()
    inst, = autokernel.explain(block, x, r, options=options).instances
    assert inst.status == "hit" and inst.flags["residual"] is True
