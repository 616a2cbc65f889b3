"""The backend finds RMSNorm however a model spells it, and the rewritten graph matches eager.

Each spelling is first explained on an empty cache (found, status ``miss``, right variant flags), then
the cache gets an entry for every miss (``make_hits``), explain reports ``hit``, and the model compiled
with ``aot_eager`` (one test with Inductor) runs our ``torch.ops.autokernel`` ops and matches the float64
reference (the same eager code on ``.double()`` copies) in output and in the grads of x and the weight.

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
from models import HFLlama, rand_weight
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

backend_module = importlib.import_module("autokernel.backend")  # ``autokernel.backend`` is the function

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {getattr(torch.ops.autokernel, name).default
          for name in ("rms_norm", "rms_norm_train", "add_rms_norm", "add_rms_norm_train")}


# ---------------------------------------------------------------- fixtures and helpers


def explain(fn, inputs, cache_dir: str) -> autokernel.Report:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return report


def _entry(inst: autokernel.InstanceReport) -> dict:
    f = inst.flags
    key = pattern_key(f["mode"], f["offset"], DTYPES[inst.dtype],
                      None if f["weight"] == "none" else DTYPES[f["weight"]], DTYPES[f["out"]],
                      f.get("residual", False))
    hidden = inst.shape[-1] if inst.shape else 1
    rows = math.prod(inst.shape[:-1])
    return {
        "version": 1, "pattern": "rms_norm", "pattern_key": key, "hidden": hidden, "row_bucket": row_bucket(rows),
        "kernel": {"kind": "family", "config": {}}, "winner": {"fwd": "autokernel", "train": "autokernel"},
        "producer": {"strategy": "test"}, "checks": [], "created": time.time(),
    }


@pytest.fixture
def make_hits():
    """``make_hits(fn, inputs, cache_dir)``: write a cache entry for every rms_norm miss that explain
    reports for ``fn(*inputs)``, and return the second explain's report (the caller checks it says hit)."""

    def _make_hits(fn, inputs, cache_dir: str) -> autokernel.Report:
        before = explain(fn, inputs, cache_dir)
        cache = KernelCache(cache_dir, device="cpu")
        try:
            for inst in before.instances:
                if inst.pattern == "rms_norm" and inst.status == "miss":
                    cache.put_entry(_entry(inst))
        finally:
            cache.close()
        return explain(fn, inputs, cache_dir)

    return _make_hits


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: how many autokernel ops it holds, and which compiler."""
    seen = SimpleNamespace(counts=[], compilers=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS))
        seen.compilers.append(opts.compiler)
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def randn(*shape: int, dtype: torch.dtype, seed: int, requires_grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_(requires_grad)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def run_and_grads(fn, inputs, params, dys=None):
    """Forward, then backward of sum(out * dy) over every output; returns outputs, dys and grads."""
    outs = _outputs(fn(*inputs))
    if dys is None:
        dys = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i)).to(o.dtype)
               for i, o in enumerate(outs)]
    leaves = [t for t in (*inputs, *params) if t.requires_grad]
    loss = sum((o.to(torch.float64) * dy.to(torch.float64)).sum() for o, dy in zip(outs, dys, strict=True))
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return [o.detach() for o in outs], dys, [g.detach() for g in grads]


def check_against_reference(model: nn.Module, compiled, inputs, dtype: torch.dtype, what: str) -> None:
    """The compiled outputs and grads (x and every parameter) against the same eager code in float64."""
    outs, dys, grads = run_and_grads(compiled, inputs, list(model.parameters()))
    ref_model = copy.deepcopy(model).double()
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_outs, _, ref_grads = run_and_grads(ref_model, ref_inputs, list(ref_model.parameters()), dys)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.dtype == _outputs(model(*inputs))[i].dtype
        assert_close(o, r, dtype, f"{what}: output {i}")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, r, dtype, f"{what}: grad {i}")


def compile_aot_eager(model, cache_dir: str):
    return torch.compile(model, backend=autokernel.backend,
                         options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})


def rms(report: autokernel.Report) -> list[autokernel.InstanceReport]:
    return [i for i in report.instances if i.pattern == "rms_norm"]


# ---------------------------------------------------------------- spellings


class HFNoWeight(nn.Module):
    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        input_dtype = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        return (h * torch.rsqrt(v + self.eps)).to(input_dtype)


class Gemma(nn.Module):
    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GptFast(nn.Module):
    def __init__(self, h: int, eps: float = 1e-5):
        super().__init__()
        self.weight = rand_weight(h)
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class FunctionalRms(nn.Module):
    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class TorchRms(FunctionalRms):
    def forward(self, x):
        return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Commuted(nn.Module):
    """Every operand order flipped: rsqrt(eps + v) * h, h.to(dtype) * w."""

    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = torch.mean(h.pow(2), dim=-1, keepdim=True)
        h = torch.rsqrt(self.eps + v) * h
        return h.to(dt) * self.weight


class DivSqrt(nn.Module):
    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h / torch.sqrt(v + self.eps)
        return self.weight * h.to(dt)


class ReciprocalSqrt(DivSqrt):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.reciprocal(torch.sqrt(v + self.eps))
        return self.weight * h.to(dt)


class EpsLiteral(DivSqrt):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(v + 1e-5)
        return self.weight * h.to(dt)


class OnePlusWeightLast(Gemma):
    """Gemma with the offset written the other way round: weight.float() + 1."""

    def forward(self, x):
        output = self._norm(x.float())
        return (output * (self.weight.float() + 1.0)).type_as(x)


def nn_rmsnorm(h: int) -> nn.Module:
    m = nn.RMSNorm(h)
    with torch.no_grad():
        m.weight.copy_(rand_weight(h))
    return m


def nn_rmsnorm_no_affine(h: int) -> nn.Module:
    return nn.RMSNorm(h, elementwise_affine=False)


# name: (factory(h), mode, offset, has_weight)
SPELLINGS = {
    "hf_llama": (HFLlama, "llama", 0.0, True),
    "hf_no_weight": (HFNoWeight, "gemma", 0.0, False),
    "gemma": (Gemma, "gemma", 1.0, True),
    "gemma_weight_plus_one": (OnePlusWeightLast, "gemma", 1.0, True),
    "gpt_fast": (GptFast, "llama", 0.0, True),
    "F.rms_norm": (FunctionalRms, "gemma", 0.0, True),
    "torch.rms_norm": (TorchRms, "gemma", 0.0, True),
    "nn.RMSNorm": (nn_rmsnorm, "gemma", 0.0, True),
    "nn.RMSNorm_no_affine": (nn_rmsnorm_no_affine, "gemma", 0.0, False),
    "commuted": (Commuted, "llama", 0.0, True),
    "div_sqrt": (DivSqrt, "llama", 0.0, True),
    "reciprocal_sqrt": (ReciprocalSqrt, "llama", 0.0, True),
    "eps_literal": (EpsLiteral, "llama", 0.0, True),
}

# In float32 the Llama spelling's casts are no-ops and vanish from the aten graph: ``weight * n`` is mode gemma
# (the same math in float32; see match.py: mode llama needs the mid cast).
FP32_MODE = {"llama": "gemma", "gemma": "gemma"}

def case(name: str, dt: str, shape: tuple[int, ...], marks=()):
    return pytest.param(name, dt, shape, id=f"{name}-{dt}-{'x'.join(map(str, shape))}", marks=marks)


CASES = [case(name, "bf16", (2, 3, 48)) for name in SPELLINGS]
CASES += [case("hf_llama", "fp16", (2, 3, 48)), case("hf_llama", "fp32", (2, 3, 48))]
CASES += [case("hf_llama", "bf16", shape) for shape in ((5, 40), (3, 37), (48,), (2, 3, 4, 16))]
CASES += [case("hf_llama", "fp16", (2, 3, 4, 16)), case("nn.RMSNorm", "bf16", (2, 3, 4, 16))]
CASES += [case(name, "fp16", (5, 40)) for name in ("gemma", "F.rms_norm", "gpt_fast")]
CASES += [case(name, "fp32", (5, 37)) for name in ("nn.RMSNorm", "F.rms_norm", "hf_no_weight", "gemma")]
CASES += [case("gpt_fast", "fp32", (5, 40))]


@pytest.mark.parametrize(("name", "dt", "shape"), CASES)
def test_spelling_found_hit_and_matches(name, dt, shape, cache_dir, make_hits, rewritten):
    factory, mode, offset, has_weight = SPELLINGS[name]
    dtype = DTYPES[dt]
    model = factory(shape[-1]).to(dtype)
    x = randn(*shape, dtype=dtype, seed=0)

    found = rms(explain(model, [x], cache_dir))
    assert [i.status for i in found] == ["miss"], found
    inst = found[0]
    if dtype == torch.float32:
        mode = FP32_MODE[mode]
    assert inst.flags == {"mode": mode, "offset": offset, "weight": dt if has_weight else "none", "out": dt}
    assert inst.dtype == dt and inst.shape == shape and inst.requires_grad

    hits = rms(make_hits(model, [x], cache_dir))
    assert [i.status for i in hits] == ["hit"], hits
    assert hits[0].flags == inst.flags

    compiled = compile_aot_eager(model, cache_dir)
    check_against_reference(model, compiled, [x], dtype, f"{name} {dt} {shape}")
    assert rewritten.counts == [1], "the hit was not rewritten into an autokernel op"
    assert rewritten.compilers == ["aot_eager"]


class HFMixedWeight(HFLlama):
    """HF spelling with a float32 weight and bf16 activations: the product (the output) is float32."""


def test_fp32_weight_bf16_activations(cache_dir, make_hits, rewritten):
    model = HFMixedWeight(48)  # weight stays float32
    x = randn(2, 3, 48, dtype=torch.bfloat16, seed=0)
    found = rms(explain(model, [x], cache_dir))
    assert [(i.status, i.flags) for i in found] == [
        ("miss", {"mode": "llama", "offset": 0.0, "weight": "fp32", "out": "fp32"})]
    assert [i.status for i in rms(make_hits(model, [x], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "fp32 weight")
    assert rewritten.counts == [1]


def test_miss_is_left_alone(cache_dir, rewritten):
    model = HFLlama(48).to(torch.bfloat16)
    x = randn(2, 3, 48, dtype=torch.bfloat16, seed=0)
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "miss")
    assert rewritten.counts == [0]
    wanted = KernelCache(cache_dir, device="cpu")
    try:
        assert [r["pattern_key"] for _, r in wanted.wanted()] == [
            pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    finally:
        wanted.close()


# ---------------------------------------------------------------- declines


class ChannelNorm(nn.Module):
    """Normalizes over dim 1 (channels of an NCL tensor), not the last dim."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        h = x.float()
        v = h.pow(2).mean(1, keepdim=True)
        return (h * torch.rsqrt(v + self.eps)).type_as(x)


class SumNorm(HFLlama):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).sum(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon)).to(dt)


class Power3(HFLlama):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(3).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon)).to(dt)


class ReturnsVariance(HFLlama):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon)).to(dt), v


class ReturnsRstd(HFLlama):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (h * r).to(dt), r


DECLINES = {
    "channel": (lambda h: ChannelNorm(), (2, 8, 5), False, "mean over dim [1], not the last dim"),
    "sum": (SumNorm, (2, 3, 48), False, "sums the squares instead of averaging them"),
    "power3": (Power3, (2, 3, 48), True, "power 3, not 2"),
    "returns_variance": (ReturnsVariance, (2, 3, 48), False, "intermediate mean is also used by output"),
    "returns_rstd": (ReturnsRstd, (2, 3, 48), False, "intermediate rsqrt is also used by output"),
}


def _declined_setup(name: str):
    factory, shape, positive, reason = DECLINES[name]
    model = factory(shape[-1]).to(torch.bfloat16)
    x = randn(*shape, dtype=torch.float32, seed=0, requires_grad=False)
    if positive:  # a mean of cubes must stay positive for rsqrt
        x = x.abs() + 0.5
    return model, x.to(torch.bfloat16).requires_grad_(True), reason


@pytest.mark.parametrize("name", list(DECLINES))
def test_declined(name, cache_dir, rewritten):
    model, x, reason = _declined_setup(name)
    found = rms(explain(model, [x], cache_dir))
    assert found and all(i.status == "declined" and i.reason == reason for i in found), found
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, f"declined {name}")
    assert rewritten.counts == [0]


@pytest.mark.parametrize("name", ["channel", "sum"])
def test_declined_reported_once(name, cache_dir):
    model, x, _ = _declined_setup(name)
    found = rms(explain(model, [x], cache_dir))
    assert [i.status for i in found] == ["declined"], found


class ReturnsFp32Norm(HFLlama):
    """The float32 normalized value is returned too: its weightless core (out float32) is a valid RMSNorm."""

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(v + self.variance_epsilon)
        return self.weight * h.to(dt), h


def test_fp32_norm_also_returned(cache_dir, make_hits, rewritten):
    model = ReturnsFp32Norm(48).to(torch.bfloat16)
    x = randn(2, 3, 48, dtype=torch.bfloat16, seed=0)
    found = rms(explain(model, [x], cache_dir))
    assert [(i.status, i.flags) for i in found] == [
        ("miss", {"mode": "gemma", "offset": 0.0, "weight": "none", "out": "fp32"})], found
    assert [i.status for i in rms(make_hits(model, [x], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "fp32 norm returned")
    assert rewritten.counts == [1]


# ---------------------------------------------------------------- several norms in one graph


class Block(nn.Module):
    """residual add -> norm -> linear -> norm, plus the residual stream read after the first norm."""

    def __init__(self, h: int):
        super().__init__()
        self.norm1 = HFLlama(h)
        self.proj = nn.Linear(h, h, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(h, h, generator=torch.Generator().manual_seed(3)) / h ** 0.5)
        self.norm2 = Gemma(h)

    def forward(self, x, residual):
        s = x + residual
        y = self.norm2(self.proj(self.norm1(s)))
        return y + s


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_two_norms_and_residual(dt, cache_dir, make_hits, rewritten):
    dtype = DTYPES[dt]
    model = Block(40).to(dtype)
    x, r = randn(2, 3, 40, dtype=dtype, seed=0), randn(2, 3, 40, dtype=dtype, seed=1)
    found = rms(explain(model, [x, r], cache_dir))
    mode1 = "gemma" if dtype == torch.float32 else "llama"
    assert [(i.status, i.flags["mode"], i.flags["offset"], i.flags.get("residual")) for i in found] == [
        ("miss", mode1, 0.0, True), ("miss", "gemma", 1.0, None)], found
    assert [i.status for i in rms(make_hits(model, [x, r], cache_dir))] == ["hit", "hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x, r], dtype, f"block {dt}")
    assert rewritten.counts == [2]


# ---------------------------------------------------------------- Inductor


def test_inductor_hf_bf16(cache_dir, make_hits, rewritten):
    model = HFLlama(48).to(torch.bfloat16)
    x = randn(2, 3, 48, dtype=torch.bfloat16, seed=0)
    assert [i.status for i in rms(make_hits(model, [x], cache_dir))] == ["hit"]
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": cache_dir})
    check_against_reference(model, compiled, [x], torch.bfloat16, "inductor")
    assert rewritten.counts == [1] and rewritten.compilers == ["inductor"]


class NormOfNorm(nn.Module):
    """One RMSNorm feeding another directly: the second rewrite's input is the first one's output."""

    def __init__(self, h: int):
        super().__init__()
        self.inner = HFLlama(h)
        self.outer = nn.RMSNorm(h, eps=1e-6)

    def forward(self, x):
        return self.outer(self.inner(x))


def test_chained_norms_both_rewritten(cache_dir, make_hits, rewritten):
    model = NormOfNorm(48).to(torch.bfloat16)
    x = torch.randn(2, 3, 48).to(torch.bfloat16)
    report = make_hits(model, [x], cache_dir)
    assert [i.status for i in rms(report)] == ["hit", "hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "chained")
    assert rewritten.counts == [2]


@pytest.mark.parametrize("op", ["rms_norm", "_fused_rms_norm"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_single_op_spellings_are_found(op, with_weight):
    """Builds where F.rms_norm reaches aten as one op (CUDA may keep it whole; the CPU build decomposes it)."""
    import operator

    from torch._subclasses.fake_tensor import FakeTensorMode

    from autokernel.lowering.rms_norm.match import find_instances

    with FakeTensorMode():
        xv = torch.empty(4, 64, dtype=torch.bfloat16)
        wv = torch.empty(64, dtype=torch.bfloat16)
        yv, rstdv = torch.empty(4, 64, dtype=torch.bfloat16), torch.empty(4, 1)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = xv
    w = None
    if with_weight:
        w = g.placeholder("w")
        w.meta["val"] = wv
    if op == "rms_norm":
        y = g.call_function(torch.ops.aten.rms_norm.default, (x, [64], w, 1e-5))
    else:
        fused = g.call_function(torch.ops.aten._fused_rms_norm.default, (x, [64], w, 1e-5))
        fused.meta["val"] = (yv, rstdv)
        y = g.call_function(operator.getitem, (fused, 0))
        g.call_function(operator.getitem, (fused, 1)).meta["val"] = rstdv
    y.meta["val"] = yv
    g.output(y)
    (inst,) = find_instances(g)
    assert (inst.status, inst.flags["mode"], inst.params["eps"]) == ("miss", "gemma", 1e-5)
    assert inst.flags["weight"] == ("bf16" if with_weight else "none") and inst.inputs["x"] is x
