"""LayerNorm: the backend finds every spelling, declines what differs, rewrites hits that match float64
forward and backward; the kernels match the float64 reference on awkward shapes; ak-tune's entry hits.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_rms_norm_spellings import backend_module, check_against_reference, compile_aot_eager, explain, randn
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.layer_norm.kernels import (
    LayerNormConfig,
    default_config,
    effective_config,
    layer_norm_bwd,
    layer_norm_fwd,
    layer_norm_reference,
)
from autokernel.lowering.layer_norm.ops import pattern_key
from autokernel.lowering.layer_norm.problem import SUM_TILES, LayerNormProblem
from autokernel.playbook.tolerances import assert_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {torch.ops.autokernel.layer_norm.default, torch.ops.autokernel.layer_norm_train.default}
EPS = 1e-5


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: how many layer_norm ops it holds."""
    seen = SimpleNamespace(counts=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS))
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def _entry(inst: autokernel.InstanceReport, config: dict | None = None) -> dict:
    f = inst.flags
    key = pattern_key(f["mode"], DTYPES[inst.dtype], DTYPES.get(f["weight"]), DTYPES.get(f["bias"]), DTYPES[f["out"]])
    return {
        "version": 1, "pattern": "layer_norm", "pattern_key": key, "hidden": inst.shape[-1],
        "row_bucket": row_bucket(math.prod(inst.shape[:-1])), "kernel": {"kind": "family", "config": config or {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"}, "checks": [],
        "created": time.time(),
    }


def ln(report: autokernel.Report) -> list[autokernel.InstanceReport]:
    return [i for i in report.instances if i.pattern == "layer_norm"]


def make_hits(fn, inputs, cache_dir: str, config: dict | None = None) -> autokernel.Report:
    """Write a cache entry for every layer_norm miss of ``fn(*inputs)``; return the second explain's report."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in ln(explain(fn, inputs, cache_dir)):
            if inst.status == "miss":
                cache.put_entry(_entry(inst, config))
    finally:
        cache.close()
    return explain(fn, inputs, cache_dir)


# ---------------------------------------------------------------- spellings


def _params(module: nn.Module, shape, weight: bool = True, bias: bool = True) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    if weight:
        module.weight = nn.Parameter(1 + 0.3 * torch.randn(shape, generator=g))
    if bias:
        module.bias = nn.Parameter(0.3 * torch.randn(shape, generator=g))
    return module


class Functional(nn.Module):
    def __init__(self, h: int, weight: bool = True, bias: bool = True):
        super().__init__()
        _params(self, h, weight, bias)
        self.h = h

    def forward(self, x):
        return F.layer_norm(x, (self.h,), getattr(self, "weight", None), getattr(self, "bias", None), EPS)


class TorchLayerNorm(Functional):
    def forward(self, x):
        return torch.layer_norm(x, (self.h,), self.weight, None, EPS)


class Upcast(Functional):
    """F.layer_norm in float32 on an upcast input with float32 parameters, cast back."""

    def forward(self, x):
        return F.layer_norm(x.float(), (self.h,), self.weight.float(), self.bias.float(), EPS).to(x.dtype)


class HandVar(nn.Module):
    """HF-style: float32 upcast, ``var(unbiased=False)``, rsqrt, affine in float32, cast back."""

    def __init__(self, h: int):
        super().__init__()
        _params(self, h)
        self.eps = EPS

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, keepdim=True, unbiased=False)
        h = (h - mean) * torch.rsqrt(var + self.eps)
        return (h * self.weight.float() + self.bias.float()).to(dtype)


class HandPowDiv(HandVar):
    """No upcast: ``(x - mean).pow(2).mean``, ``/ sqrt(var + eps)``, ``* w + b``."""

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class HandCommuted(HandVar):
    """Operands flipped, ``d * d`` for the square, ``reciprocal(sqrt(.))``, bias first."""

    def forward(self, x):
        h = x.float()
        mean = torch.mean(h, dim=-1, keepdim=True)
        d = h - mean
        var = torch.mean(d * d, dim=-1, keepdim=True)
        h = torch.reciprocal(torch.sqrt(self.eps + var)) * d
        return (self.bias + self.weight * h).to(x.dtype)


class HandRounded(HandVar):
    """The normalized value is cast back before the affine: ``w * n.to(dtype) + b``."""

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * ((h - mean) * torch.rsqrt(var + self.eps)).to(dtype) + self.bias


class HandNoAffine(nn.Module):
    def __init__(self, h: int):
        super().__init__()

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + 1e-6)


class TwoDims(nn.Module):
    """A normalized shape over the last two dims, as F.layer_norm(x, (4, 8)) and written out."""

    def __init__(self, h: int, hand: bool = False):
        super().__init__()
        _params(self, (4, h // 4))
        self.hand = hand

    def forward(self, x):
        x = x.unflatten(-1, (4, -1))
        if not self.hand:
            return F.layer_norm(x, x.shape[-2:], self.weight, self.bias, EPS)
        mean = x.mean((-2, -1), keepdim=True)
        var = (x - mean).pow(2).mean((-2, -1), keepdim=True)
        return (x - mean) * torch.rsqrt(var + EPS) * self.weight + self.bias


def nn_layer_norm(h: int, **kwargs) -> nn.Module:
    m = nn.LayerNorm(h, eps=EPS, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3 + p.mean())
    return m


# name: (factory(h), mode, weight?, bias?, parameters' dtype: None = the model's dtype)
SPELLINGS = {
    "F.layer_norm": (Functional, "fp32", True, True),
    "F.layer_norm_no_affine": (lambda h: Functional(h, False, False), "fp32", False, False),
    "torch.layer_norm_no_bias": (lambda h: TorchLayerNorm(h, bias=False), "fp32", True, False),
    "nn.LayerNorm": (nn_layer_norm, "fp32", True, True),
    "nn.LayerNorm_no_affine": (lambda h: nn_layer_norm(h, elementwise_affine=False), "fp32", False, False),
    "nn.LayerNorm_bias_false": (lambda h: nn_layer_norm(h, bias=False), "fp32", True, False),
    "hand_var_rsqrt": (HandVar, "fp32", True, True),
    "hand_pow_div": (HandPowDiv, "fp32", True, True),
    "hand_commuted": (HandCommuted, "fp32", True, True),
    "hand_rounded": (HandRounded, "rounded", True, True),
    "hand_no_affine": (HandNoAffine, "fp32", False, False),
    "two_dims": (TwoDims, "fp32", True, True),
    "two_dims_hand": (lambda h: TwoDims(h, hand=True), "fp32", True, True),
}


def case(name: str, dt: str, shape: tuple[int, ...]):
    return pytest.param(name, dt, shape, id=f"{name}-{dt}-{'x'.join(map(str, shape))}")


CASES = [case(name, "bf16", (2, 3, 40)) for name in SPELLINGS]
CASES += [case(name, "fp16", (5, 36)) for name in ("F.layer_norm", "hand_rounded", "two_dims")]
CASES += [case(name, "fp32", (37, 20)) for name in ("nn.LayerNorm", "hand_var_rsqrt", "hand_no_affine")]


@pytest.mark.parametrize(("name", "dt", "shape"), CASES)
def test_spelling_found_hit_and_matches(name, dt, shape, cache_dir, rewritten):
    factory, mode, has_w, has_b = SPELLINGS[name]
    dtype = DTYPES[dt]
    model = factory(shape[-1]).to(dtype)
    x = randn(*shape, dtype=dtype, seed=0)
    found = ln(explain(model, [x], cache_dir))
    assert [i.status for i in found] == ["miss"], found
    inst = found[0]
    if dtype == torch.float32:
        mode = "fp32"  # the cast back is a no-op in float32 and vanishes from the graph
    assert inst.flags == {"mode": mode, "weight": dt if has_w else "none", "bias": dt if has_b else "none", "out": dt}
    # the normalized dims are one row width: (2, 3, 4, 10) normalized over (4, 10) is 6 rows of 40
    assert inst.dtype == dt and inst.shape == (*shape[:-1], shape[-1]) and inst.requires_grad

    assert [i.status for i in ln(make_hits(model, [x], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], dtype, f"{name} {dt} {shape}")
    assert rewritten.counts == [1], "the hit was not rewritten into an autokernel op"


def test_upcast_functional_has_float32_parameters(cache_dir, rewritten):
    model = Upcast(40)  # parameters stay float32, activations bf16
    x = randn(4, 40, dtype=torch.bfloat16, seed=0)
    found = ln(explain(model, [x], cache_dir))
    assert [(i.status, i.flags) for i in found] == [
        ("miss", {"mode": "fp32", "weight": "fp32", "bias": "fp32", "out": "bf16"})], found
    assert [i.status for i in ln(make_hits(model, [x], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "upcast")
    assert rewritten.counts == [1]


def test_chunked_config_and_no_grad_forward_only(cache_dir, rewritten):
    """A cached chunked config is served; under no_grad the forward-only op runs."""
    model = nn_layer_norm(100).to(torch.bfloat16)
    x = randn(3, 100, dtype=torch.bfloat16, seed=1)
    assert [i.status for i in ln(make_hits(model, [x], cache_dir, {"block_n": 32, "bwd_programs_per_sm": 1}))] == [
        "hit"]
    compiled = compile_aot_eager(model, cache_dir)
    check_against_reference(model, compiled, [x], torch.bfloat16, "chunked")
    with torch.no_grad():
        y = compiled(x.detach())
    assert_close(y, F.layer_norm(x.double(), (100,), model.weight.double(), model.bias.double(), EPS),
                 torch.bfloat16, "no_grad")


def test_claimed_before_rms_norm(cache_dir, rewritten):
    """``d * rsqrt(mean(d * d) + eps) * w`` inside a LayerNorm is an RMSNorm of the centered ``d``: with both
    families tuned, the LayerNorm (earlier in claiming order) takes the nodes."""
    from test_rms_norm_spellings import _entry as rms_entry

    model = HandCommuted(40).to(torch.bfloat16)
    x = randn(2, 3, 40, dtype=torch.bfloat16, seed=0)
    found = explain(model, [x], cache_dir).instances
    assert ("layer_norm", "miss") in [(i.pattern, i.status) for i in found], found
    # The backend may report the inner RMSNorm as a miss of its own or not at all (claimed by the LayerNorm);
    # either way, with every reported miss tuned, only the LayerNorm is served.
    cache = KernelCache(cache_dir, device="cpu")
    for inst in found:
        cache.put_entry(_entry(inst) if inst.pattern == "layer_norm" else rms_entry(inst))
    cache.close()
    assert [(i.pattern, i.status) for i in explain(model, [x], cache_dir).instances] == [("layer_norm", "hit")]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "claiming order")
    assert rewritten.counts == [1]


# ---------------------------------------------------------------- declines


class Unbiased(HandVar):
    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True) + self.eps) * self.weight + self.bias


class ChannelNorm(nn.Module):
    def __init__(self, h: int):
        super().__init__()

    def forward(self, x):
        h = x.float()  # float32, so that eager (what a declined model runs) stays within bf16's tolerance
        mean = h.mean(1, keepdim=True)
        var = (h - mean).pow(2).mean(1, keepdim=True)
        return ((h - mean) * torch.rsqrt(var + EPS)).to(x.dtype)


class MixedDims(ChannelNorm):
    """The mean over the last dim, the variance over the last two."""

    def forward(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean((-2, -1), keepdim=True)
        return ((h - mean) * torch.rsqrt(var + EPS)).to(x.dtype)


class SubAlpha(ChannelNorm):
    """``x - 2 * mean`` through sub's alpha: not a centering."""

    def forward(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return (torch.sub(h, mean, alpha=2) * torch.rsqrt(var + EPS)).to(x.dtype)


class ReturnsMean(HandVar):
    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias, mean


class ReturnsRstd(HandVar):
    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + self.eps)
        return (x - mean) * rstd * self.weight + self.bias, rstd


class FusedStats(Functional):
    def forward(self, x):
        y, mean, _rstd = torch.native_layer_norm(x, (self.h,), self.weight, self.bias, EPS)
        return y, mean


DECLINES = {
    "unbiased": (Unbiased, "unbiased variance (correction 1)"),
    "channel": (ChannelNorm, "mean over dim [1], not the last dims"),
    "mixed_dims": (MixedDims, "variance over other dims than the mean ([-2, -1] vs [-1])"),
    "sub_alpha": (SubAlpha, "sub_1 scales by alpha or rounds: {'alpha': 2}"),
    "returns_mean": (ReturnsMean, "intermediate mean is also used by output"),
    "returns_rstd": (ReturnsRstd, "intermediate rsqrt is also used by output"),
    "fused_stats": (FusedStats, "intermediate native_layer_norm is also used by getitem_1"),
}


@pytest.mark.parametrize("name", list(DECLINES))
def test_declined(name, cache_dir, rewritten):
    factory, reason = DECLINES[name]
    model = factory(40).to(torch.bfloat16)
    x = randn(2, 3, 40, dtype=torch.bfloat16, seed=0)
    found = ln(explain(model, [x], cache_dir))
    assert [(i.status, i.reason) for i in found] == [("declined", reason)], found
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, f"declined {name}")
    assert rewritten.counts == [0]


class RowScale(HandNoAffine):
    """A multiplier per row, not per channel: only the normalization (no weight) is a LayerNorm."""

    def forward(self, x, s):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + EPS) * s


def test_row_multiplier_stays_outside(cache_dir, rewritten):
    model = RowScale(40).to(torch.bfloat16)
    x, s = randn(2, 3, 40, dtype=torch.bfloat16, seed=0), randn(2, 3, 1, dtype=torch.bfloat16, seed=1)
    found = ln(explain(model, [x, s], cache_dir))
    assert [(i.status, i.flags["weight"]) for i in found] == [("miss", "none")], found
    assert [i.status for i in ln(make_hits(model, [x, s], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x, s], torch.bfloat16, "row multiplier")
    assert rewritten.counts == [1]


# ---------------------------------------------------------------- kernels


def _check_kernels(shape, norm_ndim, dtype, mode="fp32", weight=True, bias=True, config=None, scale=1.0,
                   shift=0.0, noncontiguous=False):
    g = torch.Generator().manual_seed(sum(shape))
    pad = 3 if noncontiguous else 0
    x = (torch.randn(*shape[:-1], shape[-1] + pad, generator=g) * scale + shift).to(dtype)[..., :shape[-1]]
    norm_shape = shape[len(shape) - norm_ndim:]
    w = (1 + 0.3 * torch.randn(norm_shape, generator=g)).to(dtype) if weight else None
    b = (0.3 * torch.randn(norm_shape, generator=g)).to(dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    hidden = math.prod(norm_shape)
    cfg = config or default_config(hidden, x.numel() // hidden, dtype)
    runs = []
    for _ in range(2):
        y, mean, rstd = layer_norm_fwd(x, w, b, EPS, norm_ndim, mode, dtype, cfg, True)
        runs.append((y, mean, rstd, *layer_norm_bwd(dy, x, w, b, mean, rstd, norm_ndim, mode, cfg)))
    for first, again in zip(*runs, strict=True):
        assert (first is None and again is None) or torch.equal(first, again), "not deterministic"
    y, mean, rstd, dx, dw, db = runs[0]
    assert mean.shape == rstd.shape == shape[: len(shape) - norm_ndim] and mean.dtype == torch.float32
    x64 = x.detach().clone().requires_grad_(True)
    w64 = w.clone().requires_grad_(True) if weight else None
    b64 = b.clone().requires_grad_(True) if bias else None
    ref = layer_norm_reference(x64, w64, b64, EPS, norm_ndim, mode)
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    assert (dw is None) == (not weight) and (db is None) == (not bias)
    if weight:
        assert_close(dw, w64.grad, dtype, "dw")
    if bias:
        assert_close(db, b64.grad, dtype, "db")


SINGLE = LayerNormConfig(fwd_num_warps=2, fwd_rows_per_program=3, bwd_num_warps=2, bwd_programs_per_sm=2)
CHUNKED = LayerNormConfig(block_n=32, fwd_block_n=32, fwd_rows_per_program=2, bwd_programs_per_sm=1)


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("mode", ["fp32", "rounded"])
@pytest.mark.parametrize("config", [None, SINGLE, CHUNKED], ids=["default", "single", "chunked"])
def test_kernels_match_reference(dtype, mode, config):
    _check_kernels((13, 100), 1, dtype, mode, config=config)


@pytest.mark.parametrize(("weight", "bias"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("config", [SINGLE, CHUNKED], ids=["single", "chunked"])
def test_without_weight_or_bias(weight, bias, config):
    _check_kernels((9, 37), 1, torch.bfloat16, "rounded", weight, bias, config)


@pytest.mark.parametrize("tile", [*SUM_TILES, (8, 8, 1)], ids=str)
def test_partial_sum_tiles(tile):
    """Each tile of the partial-gradient reduction the tuner tries, and one over several steps: 12 partial rows
    (4 SMs x 3 programs on the CPU), 8 a step, the last step half masked; 37 columns, the last block ragged."""
    n, p, w = tile
    cfg = LayerNormConfig(bwd_programs_per_sm=3, sum_block_n=n, sum_block_p=p, sum_num_warps=w)
    _check_kernels((29, 37), 1, torch.bfloat16, config=cfg)
    _check_kernels((29, 37), 1, torch.float32, "rounded", bias=False, config=cfg)


def test_sum_tiles_lead_the_backward_phase():
    """A short budget runs the first few backward candidates: the reduction's tiles come right after the default
    (which the tuner puts first), each on the default backward."""
    problem = LayerNormProblem({}, "bf16", [8192, 4096], "cpu")
    base = problem.default_candidate()
    bwd = [c for phase, c in problem.candidates() if phase == "bwd"]
    tiles = [LayerNormConfig.from_dict(c).sum_tile for c in bwd[:len(SUM_TILES)]]
    assert tiles == list(SUM_TILES)
    knobs = ("sum_block_n", "sum_block_p", "sum_num_warps")
    assert all({k: v for k, v in c.items() if k not in knobs} == {k: v for k, v in base.items() if k not in knobs}
               for c in bwd[:len(SUM_TILES)])
    assert all(LayerNormConfig.from_dict(c).sum_tile == LayerNormConfig().sum_tile for c in bwd[len(SUM_TILES):])


@pytest.mark.parametrize(("shape", "norm_ndim"), [((1, 48), 1), ((1, 1), 1), ((2, 3, 4, 5), 2), ((6, 7), 2),
                                                   ((5, 3000), 1)])
def test_awkward_shapes(shape, norm_ndim):
    _check_kernels(shape, norm_ndim, torch.float32)


@pytest.mark.parametrize(("scale", "shift"), [(1e4, 0.0), (1e-3, 0.0), (1.0, 1000.0)])
@pytest.mark.parametrize("config", [SINGLE, CHUNKED], ids=["single", "chunked"])
def test_extreme_values(scale, shift, config):
    """Large and tiny magnitudes, and a mean 1000x the spread (the chunked kernel's shifted sums)."""
    _check_kernels((7, 70), 1, torch.float32, config=config, scale=scale, shift=shift)
    _check_kernels((7, 70), 1, torch.bfloat16, config=config, scale=scale)


def test_non_contiguous_rows_and_zero_row():
    _check_kernels((6, 50), 1, torch.float16, noncontiguous=True)
    x = torch.zeros(3, 20)
    y, mean, rstd = layer_norm_fwd(x, None, torch.ones(20), EPS, 1, "fp32", torch.float32, SINGLE, True)
    assert torch.equal(y, torch.ones(3, 20)) and torch.equal(mean, torch.zeros(3))
    assert_close(rstd, torch.full((3,), EPS ** -0.5, dtype=torch.float64), torch.float32, "rstd of a zero row")


def test_zero_rows_and_forward_only():
    x = torch.empty(0, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    y, mean, rstd = layer_norm_fwd(x, w, w, EPS, 1, "fp32", torch.bfloat16, SINGLE, True)
    dx, dw, db = layer_norm_bwd(x, x, w, w, mean, rstd, 1, "fp32", SINGLE)
    assert y.shape == dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16, dtype=torch.bfloat16))
    assert layer_norm_fwd(torch.randn(2, 16), None, None, EPS, 1, "fp32", torch.float32, SINGLE, False)[1:] == (
        None, None)


def test_wide_single_pass_config_goes_chunked():
    cfg = effective_config(LayerNormConfig(), 40000)
    assert cfg.chunked and cfg.fwd_chunked
    default = default_config(40000, 8, torch.bfloat16)
    assert default.chunked and default.fwd_chunked
    assert effective_config(LayerNormConfig(block_n=64, fwd_block_n=64), 60) == LayerNormConfig()
    # each pass chunks on its own: a chunked backward leaves the forward whole
    backward_only = effective_config(LayerNormConfig(block_n=32), 300)
    assert backward_only.chunked and not backward_only.fwd_chunked


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight shape \(7,\) != normalized shape \(8,\)"):
        layer_norm_fwd(x, torch.ones(7), None, EPS, 1, "fp32", torch.float32, SINGLE, True)
    with pytest.raises(ValueError, match="mode must be one of"):
        layer_norm_fwd(x, None, None, EPS, 1, "llama", torch.float32, SINGLE, True)
    with pytest.raises(ValueError, match="norm_ndim must be in"):
        layer_norm_fwd(x, None, None, EPS, 3, "fp32", torch.float32, SINGLE, True)
    with pytest.raises(ValueError, match="mean has 3 elements, expected 4"):
        layer_norm_bwd(x, x, None, None, torch.zeros(3), torch.zeros(4), 1, "fp32", SINGLE)
    with pytest.raises(ValueError, match="block_n must be 0 or a power of two"):
        LayerNormConfig(block_n=48)
    with pytest.raises(ValueError, match="fwd_block_n must be 0 or a power of two"):
        LayerNormConfig(fwd_block_n=96)
    with pytest.raises(ValueError, match="sum_block_n must be 0 or a power of two"):
        LayerNormConfig(sum_block_n=24)
    with pytest.raises(ValueError, match="sum_block_p must be > 0"):
        LayerNormConfig(sum_block_p=0)
    with pytest.raises(ValueError, match=r"sum_block_n \* sum_block_p must be <= 16384"):
        LayerNormConfig(sum_block_n=64, sum_block_p=512)
    with pytest.raises(ValueError, match="sum_num_warps must be one of"):
        LayerNormConfig(sum_num_warps=3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['warps'\]"):
        LayerNormConfig.from_dict({"warps": 4})
    assert LayerNormConfig.from_dict(CHUNKED.to_dict()) == CHUNKED


def test_opcheck_and_flavours_agree():
    """opcheck of the opaque ops (the inline ones are opchecked on CUDA: under the interpreter a triton_op's
    fake run cannot execute its kernel); eagerly both flavours compute the same bits."""
    ops = torch.ops.autokernel
    x = torch.randn(5, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(24, dtype=torch.float32, requires_grad=True)
    args = (EPS, 1, "rounded", torch.float32, "")
    torch.library.opcheck(ops.layer_norm_train, (x, w, b, *args))
    torch.library.opcheck(ops.layer_norm, (x.detach(), None, None, *args))
    y, mean, rstd = ops.layer_norm_train(x, w, b, *args)
    dy = torch.randn_like(y)
    back_args = (dy, x.detach(), w.detach(), b.detach(), mean.detach(), rstd.detach(), 1, "rounded", torch.float32,
                 "")
    torch.library.opcheck(ops.layer_norm_backward, back_args)
    assert torch.equal(ops.layer_norm(x, w, b, *args), ops.layer_norm_inline(x, w, b, *args))
    for a, c in zip(ops.layer_norm_backward(*back_args), ops.layer_norm_backward_inline(*back_args), strict=True):
        assert torch.equal(a, c)


# ---------------------------------------------------------------- ak-tune


def test_ak_tune_entry_hits(tmp_path, rewritten):
    from autokernel.playbook.tuner import TuneRequest, tune

    cache_dir = str(tmp_path / "c")
    model = nn_layer_norm(24).to(torch.bfloat16)
    x = randn(8, 24, dtype=torch.bfloat16, seed=3)
    (inst,) = ln(explain(model, [x], cache_dir))
    cache = KernelCache(cache_dir, device="cpu")
    result = tune(TuneRequest("layer_norm", inst.flags, inst.dtype, list(inst.shape)), cache, torch.device("cpu"),
                  budget_s=120)
    assert result.status == "written", result.detail
    (entry,) = [e for _, e in cache.entries()]
    assert entry["checks"] == ["smoke", "shape sweep", "stability", "determinism", "edge cases"]
    assert entry["pattern_key"] == _entry(inst)["pattern_key"]
    cache.close()
    assert [i.status for i in ln(explain(model, [x], cache_dir))] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), [x], torch.bfloat16, "tuned")
    assert rewritten.counts == [1]


def test_source_entry_is_unusable_and_the_default_runs(cache_dir, caplog):
    """LayerNorm launches only its built-in kernels: a cache entry holding kernel source is logged as unusable and
    the shape runs the default configuration, as does a family entry with a bad config."""
    import logging

    from autokernel.cache import runtime
    from autokernel.lowering.layer_norm.ops import select_config

    x = torch.randn(6, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.bfloat16)
    key = pattern_key("fp32", x.dtype, w.dtype, None, x.dtype)
    for kernel, reason in (({"kind": "source", "source": "x = 1", "config": {}}, "family configs only"),
                           ({"kind": "family", "config": {"fwd_num_warps": 3}}, "fwd_num_warps")):
        cache = KernelCache(cache_dir, device="cpu")
        cache.put_entry({"version": 1, "pattern": "layer_norm", "pattern_key": key, "hidden": 40,
                         "row_bucket": row_bucket(6), "kernel": kernel,
                         "winner": {"fwd": "autokernel", "train": "autokernel"},
                         "producer": {"strategy": "test"}, "checks": [], "created": time.time()})
        cache.close()
        runtime.invalidate()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="autokernel"):
            config = select_config(x, w, None, 1, "fp32", x.dtype, cache_dir)
        assert config == default_config(40, row_bucket(6), x.dtype)
        assert "is unusable" in caplog.text and reason in caplog.text
