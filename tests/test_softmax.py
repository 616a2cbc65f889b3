"""Softmax and log-softmax over the last dim: every spelling found and served, the declines, the kernels against
float64, the ops (opcheck), and one small ``ak-tune`` run whose entry then hits.

Each spelling is first explained on an empty cache (found, status ``miss``, right variant flags), then the cache
gets an entry for it, explain reports ``hit``, and the function compiled with ``aot_eager`` runs our
``torch.ops.autokernel`` ops and matches the float64 reference (the same code with float64 in place of float32
and of the input dtype) in output and in the grad of x.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes.
"""

from __future__ import annotations

import importlib
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.softmax.kernels import (
    MAX_SINGLE_PASS_BLOCK,
    SoftmaxConfig,
    default_config,
    effective_config,
    softmax_bwd,
    softmax_fwd,
    softmax_reference,
)
from autokernel.lowering.softmax.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

backend_module = importlib.import_module("autokernel.backend")  # ``autokernel.backend`` is the function

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {torch.ops.autokernel.softmax.default, torch.ops.autokernel.softmax_train.default}


@pytest.fixture
def rewritten(monkeypatch) -> list[int]:
    """Per graph the backend hands to its compiler: how many autokernel softmax ops it holds."""
    counts: list[int] = []
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS))
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return counts


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def softmaxes(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return [i for i in report.instances if i.pattern == "softmax"]


def put_entries(found: list[autokernel.InstanceReport], cache_dir: str, config: dict | None = None) -> None:
    """A cache entry (default config unless ``config``) for every instance found."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in found:
            rows = math.prod(inst.shape[:-1])
            cache.put_entry({
                "version": 1, "pattern": "softmax",
                "pattern_key": pattern_key(inst.flags["op"] == "log_softmax", DTYPES[inst.dtype],
                                           DTYPES[inst.flags["out"]]),
                "hidden": inst.shape[-1], "row_bucket": row_bucket(rows),
                "kernel": {"kind": "family", "config": config or {}},
                "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
                "checks": [], "created": time.time()})
    finally:
        cache.close()


def compile_aot_eager(fn, cache_dir: str):
    return torch.compile(fn, backend=autokernel.backend,
                         options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})


def check_against_reference(model: nn.Module, compiled, x: torch.Tensor, mask: torch.Tensor, tol: torch.dtype,
                            what: str) -> None:
    """Output and grad of x of ``compiled`` against the model in float64 (``up`` and ``down`` set to float64)."""
    xr = x.detach().clone().requires_grad_(True)
    y = compiled(xr, mask)
    assert y.dtype == model(x, mask).dtype and y.shape == x.shape
    dy = _randn(*y.shape, dtype=y.dtype, seed=99)
    y.backward(dy)
    model.up = model.down = torch.float64
    try:
        x64 = x.detach().double().requires_grad_(True)
        y64 = model(x64, mask.double() if mask is not None else None)
        assert y64.dtype == torch.float64
        y64.backward(dy.double())
    finally:
        del model.up, model.down  # back to the class defaults
    assert_close(y, y64, tol, f"{what}: y")
    assert_close(xr.grad, x64.grad, tol, f"{what}: dx")


# ---------------------------------------------------------------- spellings
# Each module computes in ``self.up`` where it upcasts and casts the result to ``self.down`` (None: x's dtype)
# where it downcasts; the reference sets both to float64.


class Spelling(nn.Module):
    up = torch.float32
    down = None

    def out_dtype(self, x):
        return self.down or x.dtype


class FSoftmax(Spelling):
    def forward(self, x, mask):
        return F.softmax(x, -1)


class MethodSoftmax(Spelling):
    def forward(self, x, mask):
        return x.softmax(-1)


class TorchSoftmaxKw(Spelling):
    def forward(self, x, mask):
        return torch.softmax(x, dim=-1)


class PositiveDim(Spelling):
    def forward(self, x, mask):
        return torch.softmax(x, dim=x.dim() - 1)


class NNSoftmax(Spelling):
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x, mask):
        return self.sm(x)


class HFAttention(Spelling):
    """transformers' eager attention: scale, add the mask, softmax in float32, back to the query's dtype."""

    def forward(self, x, mask):
        s = x * 0.125 + mask
        return F.softmax(s, dim=-1, dtype=self.up).to(self.out_dtype(x))


class FLogSoftmax(Spelling):
    def forward(self, x, mask):
        return F.log_softmax(x, -1)


class MethodLogSoftmaxFloat(Spelling):
    """log-softmax in float32 of a half input, result left in float32 (out dtype fp32)."""

    def forward(self, x, mask):
        return x.log_softmax(-1, dtype=self.up)


class ManualAmax(Spelling):
    def forward(self, x, mask):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)


class ManualMaxValuesUpcast(Spelling):
    def forward(self, x, mask):
        h = x.to(self.up)
        e = torch.exp(h - h.max(-1, keepdim=True).values)
        return (e / e.sum(dim=-1, keepdim=True)).to(self.out_dtype(x))


class LogSumExpUpcast(Spelling):
    def forward(self, x, mask):
        h = x.to(self.up)
        return (h - torch.logsumexp(h, dim=-1, keepdim=True)).to(self.out_dtype(x))


class HalfSoftmaxThenFloat(Spelling):
    """Softmax in the input's dtype, then widened: the widening rounds nothing back, so it stays outside and
    the softmax (out = input dtype) is served."""

    def forward(self, x, mask):
        return F.softmax(x, -1).to(self.up)


# name: (module, op flag, out dtype flag (None: the input's))
SPELLINGS = {
    "F.softmax": (FSoftmax, "softmax", None),
    "x.softmax": (MethodSoftmax, "softmax", None),
    "torch.softmax(dim=-1)": (TorchSoftmaxKw, "softmax", None),
    "dim=x.dim()-1": (PositiveDim, "softmax", None),
    "nn.Softmax": (NNSoftmax, "softmax", None),
    "hf_attention": (HFAttention, "softmax", None),
    "F.log_softmax": (FLogSoftmax, "log_softmax", None),
    "x.log_softmax(dtype=fp32)": (MethodLogSoftmaxFloat, "log_softmax", "fp32"),
    "manual_amax": (ManualAmax, "softmax", None),
    "manual_max_values_upcast": (ManualMaxValuesUpcast, "softmax", None),
    "softmax_then_float": (HalfSoftmaxThenFloat, "softmax", None),
    "logsumexp_upcast": (LogSumExpUpcast, "log_softmax", None),
}


def case(name: str, dt: str, shape: tuple[int, ...]):
    return pytest.param(name, dt, shape, id=f"{name}-{dt}-{'x'.join(map(str, shape))}")


CASES = [case(name, "bf16", (2, 3, 40)) for name in SPELLINGS]
CASES += [case("F.softmax", "fp16", (5, 37)), case("F.softmax", "fp32", (5, 37)),
          case("hf_attention", "fp16", (2, 5, 24)), case("F.log_softmax", "fp32", (3, 1, 33)),
          case("manual_amax", "fp32", (4, 20)), case("F.softmax", "bf16", (33,)),
          case("logsumexp_upcast", "fp32", (3, 17))]


@pytest.mark.parametrize(("name", "dt", "shape"), CASES)
def test_spelling_found_hit_and_matches(name, dt, shape, cache_dir, rewritten):
    module, op, out = SPELLINGS[name]
    dtype = DTYPES[dt]
    model = module()
    x = _randn(*shape, dtype=dtype, seed=0, scale=2.0)
    # Large negative values over the last quarter of the columns, as an attention mask adds them.
    mask = torch.zeros(shape, dtype=dtype).masked_fill(torch.arange(shape[-1]) >= shape[-1] * 3 // 4, -1e4)
    found = softmaxes(model, [x, mask], cache_dir)
    assert [(i.status, i.flags, i.dtype, i.shape) for i in found] == [
        ("miss", {"op": op, "out": out or dt}, dt, shape)], found
    put_entries(found, cache_dir)
    assert [i.status for i in softmaxes(model, [x, mask], cache_dir)] == ["hit"]
    check_against_reference(model, compile_aot_eager(model, cache_dir), x, mask, dtype, f"{name} {dt} {shape}")
    assert rewritten == [1], "the hit was not rewritten into an autokernel op"


def test_no_grad_uses_the_forward_only_op(cache_dir, monkeypatch):
    model = HFAttention()
    x = _randn(4, 24, dtype=torch.bfloat16, seed=1)
    mask = torch.zeros(4, 24, dtype=torch.bfloat16)
    put_entries(softmaxes(model, [x, mask], cache_dir), cache_dir)
    seen = []
    real = backend_module._compile
    monkeypatch.setattr(backend_module, "_compile", lambda gm, ex, opts: (
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function"), real(gm, ex, opts))[1])
    with torch.no_grad():
        y = compile_aot_eager(model, cache_dir)(x, mask)
    assert torch.ops.autokernel.softmax.default in seen and torch.ops.autokernel.softmax_train.default not in seen
    assert_close(y, softmax_reference(x * 0.125, False, torch.bfloat16), torch.bfloat16, "no_grad y")


def test_inductor_hf_attention(cache_dir, rewritten):
    model = HFAttention()
    x = _randn(2, 3, 40, dtype=torch.bfloat16, seed=2)
    mask = torch.zeros(2, 3, 40, dtype=torch.bfloat16)
    put_entries(softmaxes(model, [x, mask], cache_dir), cache_dir)
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": cache_dir})
    check_against_reference(model, compiled, x, mask, torch.bfloat16, "inductor")
    assert rewritten == [1]


def test_dynamic_shapes_one_graph_serves_each_shape(cache_dir, rewritten):
    """With symbolic sizes the opaque op is used; it picks its configuration from each call's shape."""
    model = FLogSoftmax()
    x = _randn(6, 40, dtype=torch.bfloat16, seed=19)
    found = softmaxes(model, [x, None], cache_dir)
    put_entries(found, cache_dir)
    compiled = torch.compile(model, backend=autokernel.backend, dynamic=True,
                             options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})
    for shape in ((6, 40), (9, 40), (17, 33)):  # another width too: no entry there, the default config
        x = _randn(*shape, dtype=torch.bfloat16, seed=20)
        check_against_reference(model, compiled, x, None, torch.bfloat16, f"dynamic {shape}")
    assert rewritten == [1], rewritten


def test_unusable_entry_serves_the_default_config(cache_dir, caplog):
    import logging

    model = FSoftmax()
    x = _randn(4, 40, dtype=torch.bfloat16, seed=21)
    put_entries(softmaxes(model, [x, None], cache_dir), cache_dir, config={"fwd_num_warps": 3})
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        check_against_reference(model, compile_aot_eager(model, cache_dir), x, None, torch.bfloat16, "bad config")
    assert "unusable" in caplog.text and "fwd_num_warps" in caplog.text


# An independent implementation of the source-kernel contract (kernels.SourceKernels), as the tuning agent writes.
AGENT_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def softmax_fwd_kernel(X, Y, stride_x, stride_y, n_rows, n_cols, LOG: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(tl.program_id(0) * ROWS_PER_PROGRAM + i, n_rows - 1)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
        shifted = x - tl.max(x, axis=0)
        total = tl.sum(tl.exp(shifted), axis=0)
        y = shifted - tl.log(total) if LOG else tl.exp(shifted) / total
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, n_rows, n_cols, LOG: tl.constexpr,
                       ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.minimum(tl.program_id(0) * ROWS_PER_PROGRAM + i, n_rows - 1)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=0)
        else:
            dx = y * dy - y * tl.sum(y * dy, axis=0)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
'''


def test_source_entry_is_served(cache_dir, rewritten, caplog):
    """A kernel-source entry (the agent's format) is loaded from the cache and launched in place of the
    built-in single-pass kernels; the tuning problem runs the same source through its checks."""
    from pathlib import Path

    from autokernel.lowering.softmax.problem import SoftmaxProblem
    from autokernel.playbook.checks import run_checks

    model = HFAttention()
    x = _randn(5, 40, dtype=torch.bfloat16, seed=22, scale=3.0)
    mask = torch.zeros_like(x)
    (inst,) = softmaxes(model, [x, mask], cache_dir)
    cache = KernelCache(cache_dir, device="cpu")
    try:
        cache.put_entry({
            "version": 1, "pattern": "softmax", "pattern_key": pattern_key(False, torch.bfloat16, torch.bfloat16),
            "hidden": 40, "row_bucket": row_bucket(5),
            "kernel": {"kind": "source", "source": AGENT_SOURCE, "config": {"fwd_rows_per_program": 2}},
            "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
            "checks": [], "created": time.time()})
    finally:
        cache.close()
    import logging

    with caplog.at_level(logging.WARNING, logger="autokernel"):
        check_against_reference(model, compile_aot_eager(model, cache_dir), x, mask, torch.bfloat16, "source entry")
    assert "softmax kernel" not in caplog.text, "the source kernel failed and the built-in default ran"
    assert rewritten == [1] and len(list(Path(cache_dir, "sources").glob("ak_*.py"))) == 1
    problem = SoftmaxProblem({"op": "log_softmax"}, "fp16", [6, 33], "cpu")
    assert run_checks(problem, {"source": AGENT_SOURCE, "bwd_rows_per_program": 4})[-1] == "edge cases"


# ---------------------------------------------------------------- declines


class OverDim1(Spelling):
    def forward(self, x, mask):
        return F.softmax(x, 1)


class ManualMixedDims(Spelling):
    def forward(self, x, mask):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(1, keepdim=True)


class ManualOverDim1(Spelling):
    def forward(self, x, mask):
        e = torch.exp(x - x.amax(1, keepdim=True))
        return e / e.sum(1, keepdim=True)


class ReturnsExp(Spelling):
    def forward(self, x, mask):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True), e


class ManualSubAlpha(Spelling):
    def forward(self, x, mask):
        e = torch.exp(torch.sub(x, x.amax(-1, keepdim=True), alpha=2))
        return e / e.sum(-1, keepdim=True)


class HalfLogSumExp(Spelling):
    def forward(self, x, mask):
        return x - x.logsumexp(-1, keepdim=True)


class InFloat64(Spelling):
    def forward(self, x, mask):
        return F.softmax(x.double(), -1).to(x.dtype)


DECLINES = {
    "dim1": (OverDim1, "softmax over dim 1, not the last dim"),
    "manual_mixed_dims": (ManualMixedDims, "max over dim [-1] but sum over dim [1]"),
    "manual_dim1": (ManualOverDim1, "softmax over dim [1], not the last dim"),
    "returns_exp": (ReturnsExp, "intermediate exp is also used by output"),
    "sub_alpha": (ManualSubAlpha, "subtracts 2 times the max"),
    "bf16_logsumexp": (HalfLogSumExp, "subtracts a bf16 logsumexp, not an fp32 one"),
    "float64": (InFloat64, "converts the input to fp64 before the softmax, not to fp32"),
}


@pytest.mark.parametrize("name", list(DECLINES))
def test_declined(name, cache_dir, rewritten):
    module, reason = DECLINES[name]
    x = _randn(2, 3, 40, dtype=torch.bfloat16, seed=3)
    mask = torch.zeros_like(x)
    found = softmaxes(module(), [x, mask], cache_dir)
    assert [(i.status, i.reason) for i in found] == [("declined", reason)], found
    # Even with a cache entry for the shape the instance would have, nothing is rewritten, and results hold.
    put_entries([autokernel.InstanceReport(0, "softmax", "miss", "", {"op": "softmax", "out": "bf16"}, "bf16",
                                           (2, 3, 40), "", True)], cache_dir)
    compiled = compile_aot_eager(module(), cache_dir)
    expected = module()(x, mask)
    got = compiled(x, mask)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,),
                    strict=True):
        assert torch.equal(g, e)
    assert rewritten == [0]


def test_upcast_used_elsewhere_serves_the_float32_softmax(cache_dir):
    """The float32 copy of x is read by other code too: it cannot be absorbed, so the softmax of it is served."""

    class UpcastShared(Spelling):
        def forward(self, x, mask):
            h = x.float()
            return F.softmax(h, -1), h * 2

    found = softmaxes(UpcastShared(), [_randn(3, 16, dtype=torch.bfloat16, seed=4), None], cache_dir)
    assert [(i.status, i.flags, i.dtype) for i in found] == [("miss", {"op": "softmax", "out": "fp32"}, "fp32")]


@pytest.mark.parametrize("op", ["_softmax", "_log_softmax"])
def test_half_to_float_spelling_is_found(op):
    """CUDA builds spell ``softmax(x, dim=-1, dtype=torch.float32)`` of a half x as ``_softmax(x, -1, True)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autokernel.lowering.softmax.match import find_instances

    with FakeTensorMode():
        xv, yv = torch.empty(4, 64, dtype=torch.float16), torch.empty(4, 64, dtype=torch.float32)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = xv
    y = g.call_function(getattr(torch.ops.aten, op).default, (x, 1, True))
    y.meta["val"] = yv
    g.output(y)
    (inst,) = find_instances(g)
    assert (inst.status, inst.dtype, inst.inputs["x"]) == ("miss", "fp16", x)
    assert inst.flags == {"op": op.lstrip("_"), "out": "fp32"} and inst.params["out_dtype"] == torch.float32


# ---------------------------------------------------------------- kernels
SINGLE = SoftmaxConfig(fwd_num_warps=1, bwd_num_warps=1)
BATCHED = SoftmaxConfig(fwd_num_warps=1, bwd_num_warps=2, fwd_rows_per_program=3, bwd_rows_per_program=2)
CHUNKED = SoftmaxConfig(fwd_num_warps=1, bwd_num_warps=1, fwd_block_n=16, bwd_block_n=32, fwd_rows_per_program=2,
                        bwd_rows_per_program=3)
CONFIGS = {"single": SINGLE, "batched": BATCHED, "chunked": CHUNKED}


def _check_kernels(x: torch.Tensor, log: bool, config: SoftmaxConfig, out_dtype: torch.dtype | None = None,
                   dy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = out_dtype or x.dtype
    y = softmax_fwd(x, log, out_dtype, config)
    assert y.shape == x.shape and y.dtype == out_dtype and y.is_contiguous()
    xr = x.detach().clone().requires_grad_(True)
    ref = softmax_reference(xr, log, out_dtype)
    tol = max((x.dtype, out_dtype), key=[torch.float32, torch.float16, torch.bfloat16].index)
    assert_close(y, ref, tol, "y")
    if dy is None:
        dy = _randn(*x.shape, dtype=out_dtype, seed=1234)
    ref.backward(dy.double())
    dx = softmax_bwd(dy, y, log, x.dtype, config)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    assert_close(dx, xr.grad, tol, "dx")
    return y, dx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernels_dtypes(dtype, log, config):
    _check_kernels(_randn(7, 37, dtype=dtype, seed=0, scale=3.0), log, CONFIGS[config])


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("x_dtype", "out_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
def test_kernels_other_out_dtype(log, x_dtype, out_dtype):
    for config in (SINGLE, CHUNKED):
        _check_kernels(_randn(5, 50, dtype=x_dtype, seed=1), log, config, out_dtype)


@pytest.mark.parametrize("shape", [(37,), (1, 37), (1, 1), (2, 3, 1, 37), (4, 1)], ids=str)
def test_kernels_ranks_and_tiny(shape):
    for config in (SINGLE, CHUNKED):
        _check_kernels(_randn(*shape, dtype=torch.float16, seed=2), False, config)
        _check_kernels(_randn(*shape, dtype=torch.float16, seed=2), True, config)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_kernels_wide_row_past_the_single_pass_limit(log):
    # A single-pass config on a row too wide for one block still runs (switched to chunks).
    x = _randn(2, MAX_SINGLE_PASS_BLOCK + 1000, dtype=torch.float32, seed=3, scale=4.0)
    _check_kernels(x, log, SoftmaxConfig())


@pytest.mark.parametrize("scale", [1e4, 1e-3], ids=["large", "small"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_kernels_magnitudes(scale, dtype, log):
    x = _randn(6, 100, dtype=dtype, seed=4, scale=scale)
    _check_kernels(x, log, BATCHED)
    _check_kernels(x, log, CHUNKED)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernels_masks(config):
    """-inf and finfo.min entries (attention masks), a row with one live entry, a row of zeros."""
    x = _randn(6, 70, dtype=torch.bfloat16, seed=5, scale=2.0)
    x[0, 10:] = -float("inf")
    x[1, :-1] = -float("inf")
    x[2, ::3] = torch.finfo(torch.bfloat16).min
    x[3] = 0.0
    y, _ = _check_kernels(x, False, CONFIGS[config])
    assert torch.equal(y[1, -1], torch.tensor(1.0, dtype=torch.bfloat16)) and not y[1, :-1].any()
    # log_softmax of -inf is -inf; its gradient there is dy (exp(-inf) = 0), as in eager.
    y, dx = _check_kernels(x, True, CONFIGS[config])
    assert torch.isneginf(y[0, 10:]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf - -inf
@pytest.mark.parametrize("config", ["single", "chunked"])
def test_kernels_fully_masked_row_is_nan_as_in_eager(config):
    x = _randn(3, 40, dtype=torch.float32, seed=6)
    x[1] = -float("inf")
    y = softmax_fwd(x, False, torch.float32, CONFIGS[config])
    eager = torch.softmax(x, -1)
    assert torch.isnan(eager[1]).all() and torch.isnan(y[1]).all()
    assert_close(y[[0, 2]], eager[[0, 2]].double(), torch.float32, "live rows")


@pytest.mark.parametrize("config", ["single", "chunked"])
def test_kernels_non_contiguous(config):
    x = _randn(9, 160, dtype=torch.bfloat16, seed=7)[:, :100]
    dy = _randn(9, 130, dtype=torch.bfloat16, seed=8)[:, :100]
    assert not x.is_contiguous() and x.stride(-1) == 1
    _check_kernels(x, False, CONFIGS[config], dy=dy)
    xt = _randn(50, 6, dtype=torch.float32, seed=9).t()  # column stride != 1
    _check_kernels(xt, True, CONFIGS[config], dy=_randn(50, 6, dtype=torch.float32, seed=10).t())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernels_deterministic(config):
    x = _randn(11, 300, dtype=torch.bfloat16, seed=11, scale=3.0)
    dy = _randn(11, 300, dtype=torch.bfloat16, seed=12)
    for log in (False, True):
        runs = []
        for _ in range(2):
            y = softmax_fwd(x, log, torch.bfloat16, CONFIGS[config])
            runs.append((y, softmax_bwd(dy, y, log, torch.bfloat16, CONFIGS[config])))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_kernels_empty():
    for shape in ((0, 16), (4, 0)):
        x = torch.empty(shape, dtype=torch.bfloat16)
        y = softmax_fwd(x, False, torch.bfloat16, SINGLE)
        dx = softmax_bwd(torch.empty(shape, dtype=torch.bfloat16), y, False, torch.bfloat16, SINGLE)
        assert y.shape == shape and dx.shape == shape


def test_reference_gradient_is_autograds_at_float64():
    """The reference's backward (aten's, on the stored output) is autograd's when the output is kept in float64."""
    x = _randn(4, 30, dtype=torch.float32, seed=13, scale=3.0)
    dy = _randn(4, 30, dtype=torch.float64, seed=14)
    for log, fn in ((False, torch.softmax), (True, torch.log_softmax)):
        a = x.double().requires_grad_(True)
        softmax_reference(a, log, torch.float64).backward(dy)
        b = x.double().requires_grad_(True)
        fn(b, -1).backward(dy)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    x = _randn(2, 8, dtype=torch.float32, seed=15)
    with pytest.raises(ValueError, match="x must be float32"):
        softmax_fwd(x.to(torch.int32), False, torch.float32, SINGLE)
    with pytest.raises(ValueError, match="out_dtype"):
        softmax_fwd(x, False, torch.int64, SINGLE)
    with pytest.raises(ValueError, match="at least one dimension"):
        softmax_fwd(torch.tensor(1.0), False, torch.float32, SINGLE)
    with pytest.raises(ValueError, match="dy shape"):
        softmax_bwd(torch.ones(2, 7), x, False, torch.float32, SINGLE)


@pytest.mark.parametrize(("d", "needle"), [
    ({"fwd_num_warp": 4}, "fwd_num_warp"), ({"fwd_num_warps": 3}, "fwd_num_warps"),
    ({"bwd_num_warps": 8.0}, "bwd_num_warps"), ({"fwd_rows_per_program": True}, "fwd_rows_per_program"),
    ({"bwd_rows_per_program": 0}, "bwd_rows_per_program"), ({"fwd_block_n": 48}, "fwd_block_n"),
    ({"bwd_block_n": -64}, "bwd_block_n"), ({"bwd_block_n": 65536}, "bwd_block_n"), ({"num_stages": 0}, "num_stages"),
])
def test_config_errors(d, needle):
    with pytest.raises(ValueError, match=needle):
        SoftmaxConfig.from_dict(d)


def test_config_round_trip_and_effective():
    cfg = SoftmaxConfig(fwd_num_warps=4, fwd_rows_per_program=3, fwd_block_n=1024, bwd_num_warps=16,
                        bwd_rows_per_program=2, bwd_block_n=0, num_stages=2)
    assert SoftmaxConfig.from_dict(cfg.to_dict()) == cfg and SoftmaxConfig.from_dict({}) == SoftmaxConfig()
    assert effective_config(cfg, 5000) == cfg
    # one chunk covers the row: single pass, same block, one read instead of two
    assert effective_config(cfg, 1000).fwd_block_n == 0
    wide = effective_config(SoftmaxConfig(), 100_000)
    assert wide.fwd_block_n > 0 and wide.bwd_block_n > 0
    for hidden in (1, 37, 4096, 8192, 32768, 100_000):
        d = default_config(hidden, 8192, torch.bfloat16)
        assert effective_config(d, hidden) == d
        assert (d.fwd_block_n > 0) == (hidden > MAX_SINGLE_PASS_BLOCK)


# ---------------------------------------------------------------- ops and ak-tune


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = _randn(5, 24, dtype=dtype, seed=16)
    y = torch.softmax(x.float(), -1).to(dtype)
    dy = _randn(5, 24, dtype=dtype, seed=17)
    ops = torch.ops.autokernel
    torch.library.opcheck(ops.softmax, (x, False, dtype, ""))
    torch.library.opcheck(ops.softmax, (x, True, torch.float32, ""))
    torch.library.opcheck(ops.softmax_train, (x.clone().requires_grad_(True), False, dtype, ""))
    torch.library.opcheck(ops.softmax_train, (x.clone().requires_grad_(True), True, dtype, ""))
    torch.library.opcheck(ops.softmax_backward, (dy, y, False, dtype, ""))


def test_ak_tune_writes_an_entry_that_hits(tmp_path):
    from autokernel.playbook.tuner import TuneRequest, tune

    cache = KernelCache(tmp_path, device="cpu")
    try:
        result = tune(TuneRequest("softmax", {"op": "log_softmax", "out": "bf16"}, "bf16", [4, 40]), cache,
                      torch.device("cpu"), budget_s=300)
        assert result.status == "written", result.detail
        (entry,) = [e for _, e in cache.entries()]
    finally:
        cache.close()
    assert entry["pattern_key"] == pattern_key(True, torch.bfloat16, torch.bfloat16)
    assert entry["checks"] == ["smoke", "shape sweep", "stability", "determinism", "edge cases"]
    x = _randn(4, 40, dtype=torch.bfloat16, seed=18)
    found = softmaxes(FLogSoftmax(), [x, None], str(tmp_path))
    assert [i.status for i in found] == ["hit"], found
