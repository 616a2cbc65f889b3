"""Cross-entropy: the backend finds every spelling, declines what differs in math, and the rewritten graph
matches a float64 reference forward and backward; the kernels on awkward shapes; a tiny ``ak-tune`` run.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes.
"""

from __future__ import annotations

import importlib
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.cross_entropy.kernels import (
    CrossEntropyConfig,
    count_valid,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_reference,
    default_config,
    launch_rows,
)
from autokernel.lowering.cross_entropy.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

backend_module = importlib.import_module("autokernel.backend")  # ``autokernel.backend`` is the function

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AK_OPS = {torch.ops.autokernel.cross_entropy.default, torch.ops.autokernel.cross_entropy_train.default}
V = 40  # classes in the spelling tests


def explain(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return [i for i in report.instances if i.pattern == "cross_entropy"]


def _entry(inst: autokernel.InstanceReport) -> dict:
    f = inst.flags
    dtype = DTYPES[inst.dtype]
    key = pattern_key(f["reduction"], f["ignore_index"], f["label_smoothing"], dtype,
                      torch.float32 if f["upcast"] else dtype)
    return {
        "version": 1, "pattern": "cross_entropy", "pattern_key": key, "hidden": inst.shape[-1],
        "row_bucket": row_bucket(math.prod(inst.shape[:-1])),
        "kernel": {"kind": "family", "config": {"fwd_block_n": 16, "train_block_n": 32, "bwd_block_n": 16,
                                                "fwd_num_warps": 1, "train_num_warps": 1, "bwd_num_warps": 1}},
        "winner": {"fwd": "autokernel", "train": "autokernel"},
        "producer": {"strategy": "test"}, "checks": [], "created": time.time(),
    }


def make_hits(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    """Write a cache entry (small blocks: the chunk loops run several times) for every miss; explain again."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in explain(fn, inputs, cache_dir):
            if inst.status == "miss":
                cache.put_entry(_entry(inst))
    finally:
        cache.close()
    return explain(fn, inputs, cache_dir)


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: how many autokernel cross-entropy ops it holds."""
    seen = SimpleNamespace(counts=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in AK_OPS))
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def logits_labels(rows: int, dtype: torch.dtype, seed: int, ignore: int = -100, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*lead, rows, V, generator=g)).to(dtype).requires_grad_(True)
    y = torch.randint(0, V, (*lead, rows), generator=g)
    y.view(-1)[1::4] = ignore
    return x, y


# ---------------------------------------------------------------- spellings


def ce_upcast(x, y):
    return F.cross_entropy(x.float(), y)


def ce_sum_ignore3(x, y):
    return F.cross_entropy(x, y, ignore_index=3, reduction="sum")


def ce_none(x, y):
    return F.cross_entropy(x, y, reduction="none")


def ce_smooth_mean(x, y):
    return F.cross_entropy(x.float(), y, label_smoothing=0.1)


def ce_smooth_sum(x, y):
    return F.cross_entropy(x, y, label_smoothing=0.25, reduction="sum")


def nll_of_log_softmax(x, y):
    return F.nll_loss(F.log_softmax(x.float(), dim=-1), y)


class Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.loss = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.05)

    def forward(self, x, y):
        return self.loss(x.float(), y)


def hf_causal_lm(logits, labels):
    """transformers >= 4.46 ForCausalLMLoss with num_items_in_batch: upcast, pad-shift the labels,
    flatten, reduction="sum", divide."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    loss = F.cross_entropy(logits.view(-1, V), shift_labels.view(-1), ignore_index=-100, reduction="sum")
    return loss / 5


def hf_causal_lm_old(logits, labels):
    """Older transformers: slice the logits, .contiguous(), flatten, mean."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1))


# (fn, dtype, leading dims, flags expected, logits dtype the op reads)
SPELLINGS = {
    "upcast_mean": (ce_upcast, "bf16", (), {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0,
                                            "upcast": True}, "bf16"),
    "sum_ignore3": (ce_sum_ignore3, "fp32", (), {"reduction": "sum", "ignore_index": 3, "label_smoothing": 0.0,
                                                 "upcast": False}, "fp32"),
    "none_fp16": (ce_none, "fp16", (), {"reduction": "none", "ignore_index": -100, "label_smoothing": 0.0,
                                        "upcast": False}, "fp16"),
    "smooth_mean": (ce_smooth_mean, "bf16", (), {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.1,
                                                 "upcast": True}, "bf16"),
    "smooth_sum": (ce_smooth_sum, "fp32", (), {"reduction": "sum", "ignore_index": -100, "label_smoothing": 0.25,
                                               "upcast": False}, "fp32"),
    "nll_log_softmax": (nll_of_log_softmax, "fp16", (), {"reduction": "mean", "ignore_index": -100,
                                                         "label_smoothing": 0.0, "upcast": True}, "fp16"),
    "module_smooth_none": (Module(), "bf16", (), {"reduction": "none", "ignore_index": -100,
                                                  "label_smoothing": 0.05, "upcast": True}, "bf16"),
    "hf_causal_lm": (hf_causal_lm, "bf16", (2,), {"reduction": "sum", "ignore_index": -100, "label_smoothing": 0.0,
                                                  "upcast": True}, "bf16"),
    "hf_causal_lm_old": (hf_causal_lm_old, "fp32", (2,), {"reduction": "mean", "ignore_index": -100,
                                                          "label_smoothing": 0.0, "upcast": False}, "fp32"),
}


def _inputs(name: str):
    fn, dtype, lead, _flags, _xdtype = SPELLINGS[name]
    ignore = 3 if name == "sum_ignore3" else -100
    return fn, logits_labels(7, DTYPES[dtype], seed=len(name), ignore=ignore, lead=lead)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_found(name, cache_dir):
    fn, inputs = _inputs(name)
    found = explain(fn, inputs, cache_dir)
    _fn, _dtype, lead, flags, xdtype = SPELLINGS[name]
    assert [i.status for i in found] == ["miss"], [(i.status, i.reason) for i in found]
    assert found[0].flags == flags and found[0].dtype == xdtype
    rows = 7 * math.prod(lead) - (math.prod(lead) if name == "hf_causal_lm_old" else 0)
    assert tuple(found[0].shape) == (rows, V)


def _check_against_reference(fn, inputs, compiled, dtype: torch.dtype, what: str) -> None:
    """Loss and logits' grad of ``compiled`` against ``fn`` on float64 copies of the logits."""
    x, y = inputs
    out = compiled(x, y)
    dloss = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, dloss)
    x64 = x.detach().double().requires_grad_(True)
    ref = fn(x64, y)
    (gref,) = torch.autograd.grad(ref, x64, dloss.double())
    assert out.dtype == fn(x, y).dtype and gx.dtype == x.dtype
    tol = torch.float32 if out.dtype == torch.float32 else dtype
    assert_close(out, ref, tol, f"{what}: loss")
    assert_close(gx, gref, dtype, f"{what}: grad")


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_rewritten_matches_reference(name, cache_dir, rewritten):
    fn, inputs = _inputs(name)
    hits = make_hits(fn, inputs, cache_dir)
    assert [i.status for i in hits] == ["hit"], [(i.status, i.reason) for i in hits]
    compiled = torch.compile(fn, backend=autokernel.backend,
                             options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})
    _check_against_reference(fn, inputs, compiled, DTYPES[SPELLINGS[name][1]], name)
    assert sum(rewritten.counts) == 1, rewritten.counts


def test_forward_only_op_under_no_grad(cache_dir, rewritten):
    x, y = logits_labels(9, torch.bfloat16, seed=5)
    make_hits(ce_smooth_mean, (x, y), cache_dir)
    compiled = torch.compile(ce_smooth_mean, backend=autokernel.backend,
                             options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})
    with torch.no_grad():
        out = compiled(x, y)
    assert_close(out, ce_smooth_mean(x.detach().double(), y), torch.float32, "no_grad loss")
    assert rewritten.counts == [1]


def test_dynamic_shapes(cache_dir, rewritten):
    """dynamic=True: the op serves each call's shape from one graph; label smoothing, whose coefficient
    e / C becomes symbolic, is declined with that reason."""
    fn, inputs = _inputs("hf_causal_lm")
    make_hits(fn, inputs, cache_dir)
    compiled = torch.compile(fn, backend=autokernel.backend, dynamic=True,
                             options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})
    _check_against_reference(fn, inputs, compiled, torch.bfloat16, "dynamic")
    x, y = inputs
    shorter = (x.detach()[:, :4].clone().requires_grad_(True), y[:, :4].clone())
    _check_against_reference(fn, shorter, compiled, torch.bfloat16, "dynamic, second shape")
    assert rewritten.counts == [1]
    torch._dynamo.reset()
    x, y = logits_labels(7, torch.bfloat16, 1)
    torch._dynamo.mark_dynamic(x, 1)  # the number of classes
    smoothed = autokernel.explain(ce_smooth_mean, x, y, options={"autokernel.cache_dir": cache_dir})
    reasons = [i.reason for i in smoothed.instances if i.pattern == "cross_entropy"]
    assert reasons == ["label smoothing over a symbolic number of classes"]


def test_inductor_end_to_end(cache_dir, rewritten):
    """The one test through Inductor: the opaque op (the interpreter) inside Inductor's generated code."""
    fn, inputs = _inputs("hf_causal_lm")
    make_hits(fn, inputs, cache_dir)
    compiled = torch.compile(fn, backend=autokernel.backend, options={"autokernel.cache_dir": cache_dir})
    _check_against_reference(fn, inputs, compiled, torch.bfloat16, "inductor")
    assert rewritten.counts == [1]


# ---------------------------------------------------------------- declines


def weighted(x, y):
    return F.cross_entropy(x, y, weight=torch.linspace(0.5, 1.5, V))


def soft_targets(x, y):
    return F.cross_entropy(x, torch.softmax(x.detach() * 2, -1))


def class_dim_1(x, y):
    return F.cross_entropy(x.view(7, 1, V).transpose(1, 2), y.clamp(min=0).view(7, 1))


def log_probs_reused(x, y):
    logp = F.log_softmax(x, dim=-1)
    return F.nll_loss(logp, y) + logp.exp().mean()


def log_softmax_other_dim(x, y):
    return F.nll_loss(F.log_softmax(x.view(7, V), dim=0), y)


DECLINES = {
    "weighted": (weighted, "class weights"),
    "soft_targets": (soft_targets, "probabilities as targets"),
    "class_dim_1": (class_dim_1, "class dim of a >2-D tensor"),
    "log_probs_reused": (log_probs_reused, "intermediate _log_softmax is also used"),
    "log_softmax_other_dim": (log_softmax_other_dim, "log-softmax over dim 0"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declined_with_reason(name, cache_dir, rewritten):
    fn, reason = DECLINES[name]
    inputs = logits_labels(7, torch.float32, seed=11)
    found = explain(fn, inputs, cache_dir)
    assert [i.status for i in found] == ["declined"], [(i.status, i.reason) for i in found]
    assert reason in found[0].reason
    # Nothing to cache, nothing rewritten: the compiled function still equals eager.
    compiled = torch.compile(fn, backend=autokernel.backend,
                             options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": "aot_eager"})
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))
    assert sum(rewritten.counts) == 0


def test_upcast_used_elsewhere_is_not_absorbed(cache_dir):
    """The float32 copy is returned too: the op reads it (float32) and the cast stays in the graph."""
    def fn(x, y):
        h = x.float()
        return F.cross_entropy(h, y), h

    found = explain(fn, logits_labels(7, torch.bfloat16, seed=2), cache_dir)
    assert [(i.status, i.dtype, i.flags["upcast"]) for i in found] == [("miss", "fp32", False)]


# ---------------------------------------------------------------- kernels


def _kernel_check(rows, vocab, dtype, reduction, smoothing, config, *, scale=1.0, ignore=-100, all_ignored=False,
                  out_dtype=None):
    g = torch.Generator().manual_seed(rows * 131 + vocab)
    x = (scale * torch.randn(rows, vocab, generator=g)).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[2::5] = ignore
    if all_ignored:
        y[:] = ignore
    out_dtype = out_dtype or dtype
    loss, stats = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, config, True)
    loss_only, none = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, config, False)
    assert none is None and stats.shape == (rows, 2) and stats.dtype == torch.float32
    dloss = torch.randn(loss.shape, generator=g).to(out_dtype)
    dx = cross_entropy_bwd(dloss, x, y, stats, ignore, smoothing, reduction, config)
    x64 = x.double().requires_grad_(True)
    ref = cross_entropy_reference(x64, y, ignore, smoothing, reduction)
    ref.backward(dloss.double())
    assert loss.dtype == out_dtype and dx.dtype == dtype and dx.shape == x.shape
    assert_close(loss, ref, out_dtype, f"loss {rows}x{vocab}")
    # The forward alone has its own chunk width: equal to the reference, not bitwise to the training loss.
    assert_close(loss_only, ref, out_dtype, f"forward-only loss {rows}x{vocab}")
    assert_close(dx, x64.grad, dtype, f"dlogits {rows}x{vocab}")
    # Deterministic: a second run is bitwise equal.
    loss2, stats2 = cross_entropy_fwd(x, y, ignore, smoothing, reduction, out_dtype, config, True)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats2, stats, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dx, cross_entropy_bwd(dloss, x, y, stats2, ignore, smoothing, reduction, config))
    return loss, dx


SMALL = CrossEntropyConfig(fwd_num_warps=1, fwd_block_n=64, train_num_warps=2, train_block_n=128, bwd_num_warps=1,
                           bwd_block_n=64)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 1000), (13, 77), (6, 129), (3, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_awkward_shapes(rows, vocab, dtype):
    _kernel_check(rows, vocab, dtype, "mean", 0.0, SMALL, out_dtype=torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
def test_kernels_reductions_and_smoothing(reduction, smoothing):
    _kernel_check(9, 300, torch.float16, reduction, smoothing, SMALL)


@pytest.mark.parametrize("scale", [1e4, 1e-3])
def test_kernels_extreme_magnitudes(scale):
    _kernel_check(8, 500, torch.float32, "sum", 0.1, SMALL, scale=scale)


def test_kernels_ignore_index_inside_the_classes():
    _kernel_check(11, 90, torch.bfloat16, "mean", 0.2, default_config(90, 11, torch.bfloat16), ignore=4)


def test_every_row_ignored_gives_nan_mean_and_zero_grads():
    loss, dx = _kernel_check(5, 70, torch.float32, "mean", 0.0, SMALL, all_ignored=True)
    assert loss.isnan() and torch.equal(dx, torch.zeros_like(dx))
    loss, dx = _kernel_check(5, 70, torch.float32, "sum", 0.0, SMALL, all_ignored=True)
    assert loss == 0


def test_kernels_wide_noncontiguous_rows():
    x = torch.randn(4, 3000 + 5)[:, :3000]
    y = torch.tensor([1, -100, 2999, 0])
    cfg = default_config(3000, 4, x.dtype)
    loss, stats = cross_entropy_fwd(x, y, -100, 0.0, "none", torch.float32, cfg, True)
    dloss = torch.randn(4)
    grad = cross_entropy_bwd(dloss, x, y, stats, -100, 0.0, "none", cfg)
    x64 = x.double().requires_grad_(True)
    ref = cross_entropy_reference(x64, y, -100, 0.0, "none")
    ref.backward(dloss.double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, x64.grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_written_in_the_forward(reduction):
    """The forward kernel's gradient-writing mode (linear + cross-entropy's chunks launch it, in place of
    the chunk's logits): the gradient for an upstream gradient of 1, from wide rows read twice."""
    x = torch.randn(6, 300).to(torch.bfloat16)
    y = torch.tensor([0, 5, -100, 299, 7, 1])
    loss_rows = torch.empty(6)
    grad = torch.empty_like(x)
    launch_rows(x, y, loss_rows, grad, count_valid(y, -100), -100, 0.1, reduction, SMALL)
    x64 = x.double().requires_grad_(True)
    loss = cross_entropy_reference(x64, y, -100, 0.1, reduction)
    (loss if reduction == "mean" else loss.sum()).backward()
    assert_close(grad, x64.grad, torch.bfloat16, "grad")
    assert_close(loss_rows, cross_entropy_reference(x.double(), y, -100, 0.1, "none"), torch.float32, "loss rows")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traceable_backward_launches_the_same_kernel(reduction):
    """The inline op's backward (the kernel through wrap_triton, for Inductor) against the direct launch."""
    x = torch.randn(6, 300).to(torch.bfloat16)
    y = torch.tensor([0, 5, -100, 299, 7, 1])
    loss, stats = cross_entropy_fwd(x, y, -100, 0.1, reduction, torch.float32, SMALL, True)
    dloss = torch.randn(loss.shape)
    direct = cross_entropy_bwd(dloss, x, y, stats, -100, 0.1, reduction, SMALL)
    traced = cross_entropy_bwd(dloss, x, y, stats, -100, 0.1, reduction, SMALL, traceable=True)
    assert traced.dtype == torch.bfloat16 and traced.shape == x.shape and torch.equal(traced, direct)


def test_bad_inputs_and_configs_are_named():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels hold 3 elements for 4 rows"):
        cross_entropy_fwd(x, torch.zeros(3, dtype=torch.long), -100, 0.0, "mean", x.dtype, SMALL, False)
    with pytest.raises(ValueError, match="labels must be int64 or int32"):
        cross_entropy_fwd(x, torch.zeros(4), -100, 0.0, "mean", x.dtype, SMALL, False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy_fwd(x, torch.zeros(4, dtype=torch.long), -100, 0.0, "avg", x.dtype, SMALL, False)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="dloss has 1 elements, expected 4"):
        cross_entropy_bwd(torch.ones(()), x, y, torch.zeros(4, 2), -100, 0.0, "none", SMALL)
    with pytest.raises(ValueError, match=r"stats must be float32 \[4, 2\]"):
        cross_entropy_bwd(torch.ones(()), x, y, torch.zeros(4), -100, 0.0, "mean", SMALL)
    with pytest.raises(ValueError, match="train_num_warps must be one of"):
        CrossEntropyConfig(train_num_warps=3)
    with pytest.raises(ValueError, match="bwd_block_n must be a power of two"):
        CrossEntropyConfig(bwd_block_n=1000)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['block'\]"):
        CrossEntropyConfig.from_dict({"block": 4})


def test_opcheck():
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    y = torch.tensor([1, -100, 3, 23, 0])
    ops = torch.ops.autokernel
    torch.library.opcheck(ops.cross_entropy, (x, y, -100, 0.1, "mean", torch.float32, ""))
    torch.library.opcheck(ops.cross_entropy_train, (x.clone().requires_grad_(True), y, -100, 0.0, "none",
                                                    torch.bfloat16, ""))
    _loss, stats = ops.cross_entropy_train(x, y, -100, 0.0, "sum", torch.float32, "")
    torch.library.opcheck(ops.cross_entropy_backward, (torch.randn(()), x, y, stats, -100, 0.0, "sum", torch.float32,
                                                       ""))


# ---------------------------------------------------------------- ak-tune


def test_ak_tune_writes_an_entry_that_hits(cache_dir):
    from autokernel.playbook.tuner import TuneRequest, tune

    x, y = logits_labels(7, torch.bfloat16, seed=1)
    found = explain(ce_smooth_mean, (x, y), cache_dir)
    assert [i.status for i in found] == ["miss"]
    cache = KernelCache(cache_dir, device="cpu")
    try:
        # The flags as the command line gives them: strings.
        request = TuneRequest("cross_entropy", {"reduction": "mean", "label_smoothing": "0.1", "upcast": "1"},
                              "bf16", [7, V])
        result = tune(request, cache, torch.device("cpu"), budget_s=120)
    finally:
        cache.close()
    assert result.status == "written", result.detail
    found = explain(ce_smooth_mean, (x, y), cache_dir)
    assert [i.status for i in found] == ["hit"], [(i.status, i.reason) for i in found]


def _loss_with(x, labels, ignore_index, label_smoothing):
    return F.cross_entropy(x.float(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing)


def test_arguments_made_graph_inputs_are_declined_not_a_failed_analysis(tmp_path, caplog):
    """An ignore_index (int) or label_smoothing (float) that changes between calls becomes a graph input on the
    recompile: declined, saying which, and the rest of the graph is still analysed (a dynamic ignore_index once
    failed the whole graph's analysis)."""
    x, labels = torch.randn(8, 48, dtype=torch.bfloat16), torch.randint(0, 48, (8,))
    options = {"autokernel.cache_dir": str(tmp_path)}
    for calls, changed in ([(-100, 0.1), (-100, 0.2)], "label_smoothing"), ([(-100, 0.0), (-1, 0.0)], "ignore_index"):
        torch._dynamo.reset()
        with caplog.at_level("WARNING", logger="autokernel"):
            reports = [autokernel.explain(_loss_with, x, labels, ii, ls, options=options) for ii, ls in calls]
        assert [i.status for i in reports[0].instances] == ["miss"]
        ce = [i for i in reports[1].instances if i.pattern == "cross_entropy"]
        assert len(ce) == 1 and ce[0].status == "declined", reports[1].instances
        assert ce[0].reason.startswith(f"{changed} is a graph input") and ce[0].flags[changed] == "graph input"
        assert "analysis failed" not in caplog.text
    torch._dynamo.reset()
