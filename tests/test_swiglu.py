"""The gated MLP activation (SwiGLU / GeGLU): spellings found, hits rewritten and equal to float64 forward and
backward, declines with their reasons, the kernels against the float64 reference, and ak-tune's loop.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.swiglu.kernels import (
    ACTS,
    LAYOUTS,
    SwigluConfig,
    default_config,
    swiglu_bwd,
    swiglu_fwd,
    swiglu_reference,
)
from autokernel.lowering.swiglu.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

backend_module = importlib.import_module("autokernel.backend")  # ``autokernel.backend`` is the function

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {torch.ops.autokernel.swiglu.default, torch.ops.autokernel.swiglu_train.default}
# Several column blocks per row even on tiny rows, so the grid's row/column split is exercised.
SMALL = SwigluConfig(fwd_block=16, fwd_num_warps=1, bwd_block=16, bwd_num_warps=1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, requires_grad: bool = False):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------- backend helpers


def explain(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return [i for i in report.instances if i.pattern == "swiglu"]


def make_hits(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    """A cache entry for every swiglu miss explain reports, then explain again."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in explain(fn, inputs, cache_dir):
            if inst.status != "miss":
                continue
            f = inst.flags
            cache.put_entry({
                "version": 1, "pattern": "swiglu", "pattern_key": pattern_key(f["act"], f["layout"],
                                                                              DTYPES[inst.dtype]),
                "hidden": inst.shape[-1], "row_bucket": row_bucket(math.prod(inst.shape[:-1])),
                "kernel": {"kind": "family", "config": SMALL.to_dict()},
                "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
                "checks": [], "created": time.time()})
    finally:
        cache.close()
    return explain(fn, inputs, cache_dir)


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: how many swiglu ops it holds."""
    seen = SimpleNamespace(counts=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS))
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def compile_aot_eager(model, cache_dir: str):
    return torch.compile(model, backend=autokernel.backend,
                         options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})


def check_against_reference(model: nn.Module, compiled, inputs, dtype: torch.dtype, what: str) -> None:
    """Output and the grads of every input and parameter against the same eager code in float64."""
    out = compiled(*inputs)
    assert out.dtype == dtype
    dy = torch.randn(out.shape, generator=_gen(7)).to(dtype)
    leaves = [*inputs, *model.parameters()]
    grads = torch.autograd.grad(out, leaves, dy)
    ref_model = copy.deepcopy(model).double()
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_out = ref_model(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, [*ref_inputs, *ref_model.parameters()], dy.double())
    assert_close(out, ref_out, dtype, f"{what}: output")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, r, dtype, f"{what}: grad {i}")


# ---------------------------------------------------------------- spellings


class Gated(nn.Module):
    """``body(gate, up)`` on two inputs (the projections that make them are not ours)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, gate, up):
        return self.body(gate, up)


class SiluModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.SiLU()

    def forward(self, gate, up):
        return self.act(gate) * up


class Fused(nn.Module):
    """Gate and up as the halves of one tensor: ``split(x)`` gives the two pieces."""

    def __init__(self, split, act, up_first: bool = False):
        super().__init__()
        self.split, self.act, self.up_first = split, act, up_first

    def forward(self, x):
        a, b = self.split(x)
        if self.up_first:  # diffusers' GEGLU: hidden_states, gate = proj(x).chunk(2, dim=-1)
            return a * self.act(b)
        return self.act(a) * b


class LlamaMLP(nn.Module):
    """transformers' LlamaMLP: ``down(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, h: int, inter: int, act: str = "silu"):
        super().__init__()
        g = _gen(3)
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        with torch.no_grad():
            for lin in (self.gate_proj, self.up_proj, self.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Phi3MLP(nn.Module):
    """transformers' Phi3MLP: one ``gate_up_proj``, chunked."""

    def __init__(self, h: int, inter: int):
        super().__init__()
        g = _gen(4)
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        with torch.no_grad():
            for lin in (self.gate_up_proj, self.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _chunk(x):
    return x.chunk(2, dim=-1)


def _split(x):
    return x.split(x.shape[-1] // 2, -1)


def _gelu_tanh(g):
    return F.gelu(g, approximate="tanh")


# name: (factory, fused?, act, layout)
SPELLINGS = {
    "F.silu": (lambda: Gated(lambda g, u: F.silu(g) * u), False, "silu", "separate"),
    "commuted": (lambda: Gated(lambda g, u: u * F.silu(g)), False, "silu", "separate"),
    "silu_by_hand": (lambda: Gated(lambda g, u: g * torch.sigmoid(g) * u), False, "silu", "separate"),
    "nn.SiLU": (SiluModule, False, "silu", "separate"),
    "ACT2FN[silu]": (lambda: Gated(lambda g, u: ACT2FN["silu"](g) * u), False, "silu", "separate"),
    "ACT2FN[gelu_pytorch_tanh]": (lambda: Gated(lambda g, u: ACT2FN["gelu_pytorch_tanh"](g) * u), False,
                                  "gelu_tanh", "separate"),
    "ACT2FN[gelu]": (lambda: Gated(lambda g, u: ACT2FN["gelu"](g) * u), False, "gelu", "separate"),
    "F.gelu_tanh": (lambda: Gated(lambda g, u: _gelu_tanh(g) * u), False, "gelu_tanh", "separate"),
    "F.gelu": (lambda: Gated(lambda g, u: F.gelu(g) * u), False, "gelu", "separate"),
    "chunk": (lambda: Fused(_chunk, F.silu), True, "silu", "gate_up"),
    "split": (lambda: Fused(_split, F.silu), True, "silu", "gate_up"),
    "chunk_up_first_gelu": (lambda: Fused(_chunk, F.gelu, up_first=True), True, "gelu", "up_gate"),
    "split_gelu_tanh": (lambda: Fused(_split, _gelu_tanh), True, "gelu_tanh", "gate_up"),
}


def case(name: str, dt: str, marks=()):
    return pytest.param(name, dt, id=f"{name}-{dt}", marks=marks)


CASES = [case(name, "bf16") for name in SPELLINGS]
CASES += [case("F.silu", "fp16"), case("F.silu", "fp32"), case("F.gelu", "fp32"), case("F.gelu_tanh", "fp16"),
          case("chunk", "fp32"), case("chunk", "fp16")]


@pytest.mark.parametrize(("name", "dt"), CASES)
def test_spelling_found_hit_and_matches(name, dt, cache_dir, rewritten):
    factory, fused, act, layout = SPELLINGS[name]
    dtype = DTYPES[dt]
    model = factory()
    shape = (2, 3, 40)
    inputs = ([randn(2, 3, 80, dtype=dtype, seed=0, requires_grad=True)] if fused else
              [randn(*shape, dtype=dtype, seed=0, requires_grad=True),
               randn(*shape, dtype=dtype, seed=1, requires_grad=True)])

    found = explain(model, inputs, cache_dir)
    assert [(i.status, i.flags) for i in found] == [("miss", {"act": act, "layout": layout})], found
    assert found[0].dtype == dt and found[0].shape == shape and found[0].requires_grad

    assert [i.status for i in make_hits(model, inputs, cache_dir)] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), inputs, dtype, f"{name} {dt}")
    assert rewritten.counts == [1], "the hit was not rewritten into an autokernel op"


@pytest.mark.parametrize(("model", "dt", "layout"), [
    (lambda: LlamaMLP(24, 40), "fp32", "separate"),
    (lambda: LlamaMLP(24, 40, act="gelu_pytorch_tanh"), "bf16", "separate"),
    (lambda: Phi3MLP(24, 40), "bf16", "gate_up"),
], ids=["llama_mlp-fp32", "gemma_mlp-bf16", "phi3_mlp-bf16"])
def test_mlp_blocks(model, dt, layout, cache_dir, rewritten):
    """The matmuls around the activation stay Inductor's (here aot_eager); the weights' grads flow through ours."""
    dtype = DTYPES[dt]
    model = model().to(dtype)
    x = randn(2, 5, 24, dtype=dtype, seed=0, requires_grad=True)
    hits = make_hits(model, [x], cache_dir)
    assert [(i.status, i.flags["layout"], i.shape) for i in hits] == [("hit", layout, (2, 5, 40))], hits
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], dtype, f"mlp {dt}")
    assert rewritten.counts == [1]


def test_halves_read_elsewhere_are_served_as_two_tensors(cache_dir, rewritten):
    """When a half is also returned, the halves are served as two strided views (Inductor joins the grads)."""

    class ReturnsGate(nn.Module):
        def forward(self, x):
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up + gate.mean()

    model = ReturnsGate()
    x = randn(3, 5, 32, dtype=torch.bfloat16, seed=0, requires_grad=True)
    assert [(i.status, i.flags["layout"]) for i in explain(model, [x], cache_dir)] == [("miss", "separate")]
    assert [i.status for i in make_hits(model, [x], cache_dir)] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "views")
    assert rewritten.counts == [1]


def test_no_grad_uses_the_forward_only_op(cache_dir, rewritten, monkeypatch):
    model = SPELLINGS["chunk"][0]()
    x = randn(4, 64, dtype=torch.bfloat16, seed=0)
    assert [i.status for i in make_hits(model, [x], cache_dir)] == ["hit"]
    ops_seen = []
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        ops_seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS)
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    with torch.no_grad():
        y = compile_aot_eager(model, cache_dir)(x)
    assert ops_seen == [torch.ops.autokernel.swiglu.default]
    assert_close(y, swiglu_reference(x, None, "silu", "gate_up"), torch.bfloat16, "no_grad y")


def test_inductor_chunk_bf16(cache_dir, rewritten):
    model = Phi3MLP(24, 40).to(torch.bfloat16)
    x = randn(2, 5, 24, dtype=torch.bfloat16, seed=0, requires_grad=True)
    assert [i.status for i in make_hits(model, [x], cache_dir)] == ["hit"]
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": cache_dir})
    check_against_reference(model, compiled, [x], torch.bfloat16, "inductor")
    assert rewritten.counts == [1]


# ---------------------------------------------------------------- declines


def _reuse_act(g, u):
    a = F.silu(g)
    return a * u + a


DECLINES = {
    "relu": (lambda g, u: F.relu(g) * u, "activation relu (supported: silu, gelu, gelu tanh)"),
    "sigmoid_glu": (lambda g, u: torch.sigmoid(g) * u, "activation sigmoid (supported: silu, gelu, gelu tanh)"),
    "broadcast_up": (lambda g, u: F.silu(g) * u[:1], "gate (3, 16) and up (1, 16) differ in shape (broadcasting)"),
    "act_reused": (_reuse_act, "intermediate silu is also used by add"),
    "mixed_dtype": (lambda g, u: F.silu(g) * u.float(), "gate bf16 and up fp32 differ in dtype"),
    "gate_is_up": (lambda g, u: F.silu(g) * g, "gate and up are the same tensor"),
}


@pytest.mark.parametrize("name", list(DECLINES))
def test_declined(name, cache_dir, rewritten):
    body, reason = DECLINES[name]
    model = Gated(body)
    inputs = [randn(3, 16, dtype=torch.bfloat16, seed=0, requires_grad=True),
              randn(3, 16, dtype=torch.bfloat16, seed=1, requires_grad=True)]
    found = explain(model, inputs, cache_dir)
    assert [(i.status, i.reason) for i in found] == [("declined", reason)], found
    out = compile_aot_eager(model, cache_dir)(*inputs)
    assert torch.equal(out, model(*inputs))
    assert rewritten.counts == [0]


def test_not_gated_products_are_not_reported(cache_dir):
    """``x * sigmoid(x)`` alone, ``silu(x) * 2``: activations, not gated products; nothing to report."""
    x = randn(3, 16, dtype=torch.bfloat16, seed=0)
    assert explain(lambda t: t * torch.sigmoid(t), [x], cache_dir) == []
    assert explain(lambda t: F.silu(t) * 2.0, [x], cache_dir) == []


def test_opcheck():
    ops = torch.ops.autokernel
    g, u, dy = (randn(5, 24, dtype=torch.float32, seed=s) for s in range(3))
    x = randn(5, 48, dtype=torch.bfloat16, seed=3)
    torch.library.opcheck(ops.swiglu, (g, u, "silu", "separate", ""))
    torch.library.opcheck(ops.swiglu, (x, None, "gelu_tanh", "up_gate", ""))
    torch.library.opcheck(ops.swiglu_train, (g.requires_grad_(True), u.requires_grad_(True), "gelu", "separate", ""))
    torch.library.opcheck(ops.swiglu_train, (x.requires_grad_(True), None, "silu", "gate_up", ""))
    torch.library.opcheck(ops.swiglu_backward, (dy, g.detach(), u.detach(), "silu", "separate", ""))
    torch.library.opcheck(ops.swiglu_backward, (dy.bfloat16(), x.detach(), None, "gelu", "gate_up", ""))


# ---------------------------------------------------------------- kernels against the reference


def check_kernels(x, up, act, layout, config=SMALL, dy=None) -> None:
    """y, and the grads (dgate and dup, or the one dx), against autograd through the float64 reference."""
    y = swiglu_fwd(x, up, act, layout, config)
    xr = x.detach().clone().requires_grad_(True)
    ur = up.detach().clone().requires_grad_(True) if up is not None else None
    ref = swiglu_reference(xr, ur, act, layout)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    assert_close(y, ref, x.dtype, "y")
    if dy is None:
        dy = randn(*ref.shape, dtype=x.dtype, seed=99)
    ref.backward(dy.double())
    dx, dup = swiglu_bwd(dy, x, up, act, layout, config)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    assert_close(dx, xr.grad, x.dtype, "dgate" if up is not None else "dx")
    if up is None:
        assert dup is None
    else:
        assert dup.shape == up.shape and dup.is_contiguous()
        assert_close(dup, ur.grad, x.dtype, "dup")


def _operands(rows: int, width: int, layout: str, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    if layout == "separate":
        return randn(rows, width, dtype=dtype, seed=seed, scale=scale), randn(rows, width, dtype=dtype, seed=seed + 1)
    return randn(rows, 2 * width, dtype=dtype, seed=seed, scale=scale), None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_acts_layouts(dtype, act, layout):
    check_kernels(*_operands(5, 37, layout, dtype), act, layout)


@pytest.mark.parametrize("shape", [(37,), (1, 37), (2, 3, 1, 20)], ids=["rank1", "one_row", "rank4"])
@pytest.mark.parametrize("layout", ["separate", "gate_up"])
def test_ranks(shape, layout):
    if layout == "separate":
        x, up = randn(*shape, dtype=torch.float16, seed=1), randn(*shape, dtype=torch.float16, seed=2)
    else:
        x, up = randn(*shape[:-1], 2 * shape[-1], dtype=torch.float16, seed=1), None
    check_kernels(x, up, "silu", layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wide_rows_default_config(layout):
    # 5000 columns: two full 2048-wide blocks and a ragged one per row (fused layouts go row by row).
    x, up = _operands(2, 5000, layout, torch.bfloat16, seed=3)
    check_kernels(x, up, "silu", layout, default_config(5000, 2, torch.bfloat16))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_rows_and_dy(layout):
    width = 30
    cols = width if layout == "separate" else 2 * width
    x = randn(7, cols + 9, dtype=torch.bfloat16, seed=4)[:, :cols]
    up = randn(7, cols + 5, dtype=torch.bfloat16, seed=5)[:, :cols] if layout == "separate" else None
    dy = randn(7, width + 3, dtype=torch.bfloat16, seed=6)[:, :width]
    assert not x.is_contiguous() and not dy.is_contiguous()
    check_kernels(x, up, "gelu", layout, dy=dy)


def test_column_strided_and_broadcast_dy():
    x = randn(40, 6, dtype=torch.float32, seed=7).t()
    up = randn(6, 40, dtype=torch.float32, seed=8)
    dy = randn(40, dtype=torch.float32, seed=9).expand(6, 40)  # row stride 0, as a sum's grad
    assert x.stride(-1) != 1 and dy.stride(0) == 0
    check_kernels(x, up, "silu", "separate", dy=dy)


@pytest.mark.parametrize("scale", [1e4, 1e-3], ids=["large", "small"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extreme_gates(scale, act, dtype):
    """Saturated activations (sigmoid's exp overflows to inf at a gate of -1e4) stay finite and exact."""
    x, up = _operands(4, 64, "separate", dtype, seed=10, scale=scale)
    check_kernels(x, up, act, "separate")


def test_zero_gate_row():
    x, up = _operands(3, 50, "gate_up", torch.float32, seed=11)
    x[1] = 0.0
    check_kernels(x, up, "gelu_tanh", "gate_up")


@pytest.mark.parametrize("layout", ["separate", "up_gate"])
def test_deterministic(layout):
    x, up = _operands(9, 100, layout, torch.bfloat16, seed=12)
    dy = randn(9, 100, dtype=torch.bfloat16, seed=13)
    runs = [(swiglu_fwd(x, up, "silu", layout, SMALL), *swiglu_bwd(dy, x, up, "silu", layout, SMALL))
            for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_rows(layout):
    x, up = _operands(0, 16, layout, torch.bfloat16)
    y = swiglu_fwd(x, up, "silu", layout, SMALL)
    assert y.shape == (0, 16)
    dx, dup = swiglu_bwd(torch.empty(0, 16, dtype=torch.bfloat16), x, up, "silu", layout, SMALL)
    assert dx.shape == x.shape and (dup is None) == (up is None)


def test_bad_arguments():
    g, u = randn(2, 8, dtype=torch.float32, seed=0), randn(2, 8, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="act must be one of"):
        swiglu_fwd(g, u, "relu", "separate", SMALL)
    with pytest.raises(ValueError, match="layout must be one of"):
        swiglu_fwd(g, u, "silu", "interleaved", SMALL)
    with pytest.raises(ValueError, match=r"gate shape \(2, 8\) != up shape \(1, 8\)"):
        swiglu_fwd(g, u[:1], "silu", "separate", SMALL)
    with pytest.raises(ValueError, match="gate dtype torch.float32 != up dtype torch.bfloat16"):
        swiglu_fwd(g, u.bfloat16(), "silu", "separate", SMALL)
    with pytest.raises(ValueError, match="needs an even last dim"):
        swiglu_fwd(g[:, :7], None, "silu", "gate_up", SMALL)
    with pytest.raises(ValueError, match="takes one tensor"):
        swiglu_fwd(g, u, "silu", "gate_up", SMALL)
    with pytest.raises(ValueError, match=r"dy shape \(2, 8\) != output shape \(2, 4\)"):
        swiglu_bwd(g, g, None, "silu", "gate_up", SMALL)


def test_config_round_trip_and_errors():
    cfg = SwigluConfig(fwd_block=4096, fwd_num_warps=8, bwd_block=1024, bwd_num_warps=2)
    assert SwigluConfig.from_dict(cfg.to_dict()) == cfg
    assert SwigluConfig.from_dict({}) == SwigluConfig()
    for bad, needle in [({"fwd_blocks": 1}, "fwd_blocks"), ({"fwd_block": 1000}, "fwd_block"),
                        ({"bwd_num_warps": 3}, "bwd_num_warps"), ({"fwd_num_warps": True}, "fwd_num_warps"),
                        ({"bwd_block": 2 ** 20}, "bwd_block")]:
        with pytest.raises(ValueError, match=needle):
            SwigluConfig.from_dict(bad)


# ---------------------------------------------------------------- ak-tune


def test_ak_tune_writes_an_entry_that_hits(tmp_path):
    from autokernel.lowering.swiglu.problem import SwigluProblem
    from autokernel.playbook.tuner import TuneRequest, tune

    problem = SwigluProblem({"act": "silu", "layout": "gate_up"}, "bf16", [8192, 14336], "cpu")
    assert problem.bytes_moved() == {"fwd": 3 * 8192 * 14336 * 2, "train": 8 * 8192 * 14336 * 2}
    phases = {p for p, _ in problem.candidates()}
    assert phases == {"fwd", "bwd"}
    with pytest.raises(ValueError, match="flag act"):
        SwigluProblem({"act": "relu"}, "bf16", [4, 16], "cpu")

    cache = KernelCache(tmp_path, device="cpu")
    result = tune(TuneRequest("swiglu", {"act": "silu", "layout": "gate_up"}, "bf16", [6, 24]), cache,
                  torch.device("cpu"), budget_s=300)
    assert result.status == "written", result.detail
    [(_, entry)] = list(cache.entries())
    cache.close()
    assert entry["pattern_key"] == pattern_key("silu", "gate_up", torch.bfloat16) and entry["hidden"] == 24
    assert entry["checks"] == ["smoke", "shape sweep", "stability", "determinism", "edge cases"]
    found = explain(SPELLINGS["chunk"][0](), [randn(6, 48, dtype=torch.bfloat16, seed=0)], str(tmp_path))
    assert [i.status for i in found] == ["hit"], found


# An independent implementation of the kernel contract (autokernel.lowering.swiglu.kernels.SourceKernels),
# silu only: what a tuning agent's source entry looks like.
AGENT_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, g_off, u_off, n_cols, col_blocks,
                      ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) // col_blocks
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + g_off + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + u_off + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, g_off, u_off,
                      n_cols, col_blocks, ACT: tl.constexpr, ONE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) // col_blocks
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + g_off + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + u_off + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dgate = dy * u * (s + g * s * (1.0 - s))
    if ONE_GRAD:
        tl.store(DG + row * stride_dg + g_off + cols, dgate.to(DG.dtype.element_ty), mask=mask)
        tl.store(DG + row * stride_dg + u_off + cols, (dy * g * s).to(DG.dtype.element_ty), mask=mask)
    else:
        tl.store(DG + row * stride_dg + cols, dgate.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
'''


def test_source_entry_passes_the_checks_and_is_served(tmp_path, rewritten):
    from autokernel.lowering.swiglu.problem import SwigluProblem
    from autokernel.playbook.checks import run_checks

    for layout in ("separate", "up_gate"):
        problem = SwigluProblem({"act": "silu", "layout": layout}, "bf16", [8, 40], "cpu")
        assert run_checks(problem, {**SMALL.to_dict(), "source": AGENT_SOURCE}, max_rows=8)
        broken = AGENT_SOURCE.replace("dy * g * s", "dy * s")
        with pytest.raises(Exception, match="dup|dx"):
            run_checks(problem, {**SMALL.to_dict(), "source": broken}, max_rows=8)

    model = SPELLINGS["chunk"][0]()
    x = randn(6, 48, dtype=torch.bfloat16, seed=0, requires_grad=True)
    served = AGENT_SOURCE + "# served from the cache\n"  # another text: loaded from this cache's sources/
    cache = KernelCache(tmp_path, device="cpu")
    cache.put_entry({
        "version": 1, "pattern": "swiglu", "pattern_key": pattern_key("silu", "gate_up", torch.bfloat16),
        "hidden": 24, "row_bucket": row_bucket(6), "kernel": {"kind": "source", "source": served,
                                                              "config": SMALL.to_dict()},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
        "checks": [], "created": time.time()})
    cache.close()
    check_against_reference(model, compile_aot_eager(model, str(tmp_path)), [x], torch.bfloat16, "source entry")
    assert rewritten.counts == [1]
    assert len(list((tmp_path / "sources").glob("ak_*.py"))) == 1
