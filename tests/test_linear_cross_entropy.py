"""Linear + cross-entropy: the backend finds the lm_head matmul under every cross-entropy spelling, declines what
it cannot serve, and the rewritten graph matches a float64 reference forward and backward (h, W, bias); the
chunked driver on awkward shapes; the ops' opcheck; a tiny ``ak-tune`` run.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``): tiny shapes,
few compiles.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering.linear_cross_entropy.kernels import (
    Grads,
    LinearCrossEntropyConfig,
    default_config,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    max_chunk_bytes,
)
from autokernel.lowering.linear_cross_entropy.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

backend_module = importlib.import_module("autokernel.backend")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = {torch.ops.autokernel.linear_cross_entropy.default, torch.ops.autokernel.linear_cross_entropy_train.default}
V, H = 40, 8  # classes and hidden size in the backend tests
# Small chunks and blocks: the chunk loop and the kernel's column loop both run several times.
SMALL = LinearCrossEntropyConfig(fwd_chunk_rows=3, train_chunk_rows=4, fwd_block_n=16, fwd_num_warps=1,
                                 train_block_n=32, train_num_warps=1)


def explain(fn, inputs, cache_dir: str, pattern: str = "linear_cross_entropy") -> list[autokernel.InstanceReport]:
    torch._dynamo.reset()
    report = autokernel.explain(fn, *inputs, options={"autokernel.cache_dir": cache_dir})
    torch._dynamo.reset()
    assert not report.errors, report
    return [i for i in report.instances if i.pattern == pattern]


def make_hits(fn, inputs, cache_dir: str) -> list[autokernel.InstanceReport]:
    """Write a cache entry (the SMALL config) for every miss; explain again."""
    cache = KernelCache(cache_dir, device="cpu")
    try:
        for inst in explain(fn, inputs, cache_dir):
            if inst.status != "miss":
                continue
            f, dtype = inst.flags, DTYPES[inst.dtype]
            key = pattern_key(f["reduction"], f["ignore_index"], f["label_smoothing"], dtype,
                              torch.float32 if f["upcast"] else dtype, f["bias"], f["vocab"], f["logits_out"])
            cache.put_entry({
                "version": 1, "pattern": "linear_cross_entropy", "pattern_key": key, "hidden": inst.shape[-1],
                "row_bucket": row_bucket(inst.shape[0]), "kernel": {"kind": "family", "config": SMALL.to_dict()},
                "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
                "checks": [], "created": time.time()})
    finally:
        cache.close()
    return explain(fn, inputs, cache_dir)


@pytest.fixture
def rewritten(monkeypatch) -> SimpleNamespace:
    """Per graph the backend hands to its compiler: the autokernel linear + cross-entropy calls it holds."""
    seen = SimpleNamespace(calls=[])
    real = backend_module._compile

    def spy(gm, example_inputs, opts):
        seen.calls.append([n for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS])
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend_module, "_compile", spy)
    return seen


def compiled(fn, cache_dir: str, compiler: str = "aot_eager", **kwargs):
    return torch.compile(fn, backend=autokernel.backend,
                         options={"autokernel.cache_dir": cache_dir, "autokernel.compiler": compiler}, **kwargs)


def inputs(rows: int, dtype: torch.dtype, seed: int, *, bias: bool = False, lead: tuple[int, ...] = (),
           ignore: int = -100, grad=(True, True, True)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, rows, H, generator=g).to(dtype).requires_grad_(grad[0])
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_(grad[1])
    y = torch.randint(0, V, (*lead, rows), generator=g)
    y.view(-1)[1::4] = ignore
    args = [h, w]
    if bias:
        args.append((0.5 * torch.randn(V, generator=g)).to(dtype).requires_grad_(grad[2]))
    return (*args, y)


# ---------------------------------------------------------------- spellings


def upcast_mean(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def linear_bias_smooth(h, w, b, y):
    """3-D hidden states through F.linear with a bias (view + addmm + view), flattened for the loss."""
    return F.cross_entropy(F.linear(h, w, b).view(-1, V), y.view(-1), label_smoothing=0.1)


class Head(nn.Module):
    """nn.Linear lm_head + nn.CrossEntropyLoss(reduction='sum', ignore_index=3): weight and bias are parameters."""

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(H, V)
        self.loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=3)

    def forward(self, h, y):
        return self.loss(self.lm_head(h), y)


def per_token(h, w, y):
    return F.cross_entropy(torch.matmul(h, w.t()).float(), y, reduction="none")


def hf_causal_lm(h, w, labels):
    """transformers' LlamaForCausalLM head and ForCausalLMLoss: logits returned too, upcast, labels padded and
    shifted after the lm_head, flattened, mean."""
    logits = F.linear(h, w)
    upcast = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    loss = F.cross_entropy(upcast.view(-1, upcast.size(-1)), shift_labels.view(-1), ignore_index=-100)
    return loss, logits


HEAD = Head()
# (fn, dtype, bias, leading dims, ignore_index, flags expected beyond the defaults)
SPELLINGS = {
    "upcast_mean": (upcast_mean, "bf16", False, (), -100, {"upcast": True}),
    "linear_bias_smooth": (linear_bias_smooth, "fp32", True, (2,), -100, {"bias": True, "label_smoothing": 0.1}),
    "module_sum_ignore3": (HEAD, "fp32", None, (), 3, {"bias": True, "reduction": "sum", "ignore_index": 3}),
    "per_token": (per_token, "fp16", False, (), -100, {"upcast": True, "reduction": "none"}),
    "hf_causal_lm": (hf_causal_lm, "bf16", False, (2,), -100, {"upcast": True, "logits_out": True}),
}
DEFAULT_FLAGS = {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0, "upcast": False, "bias": False,
                 "vocab": V, "logits_out": False}


def _spelling_inputs(name: str):
    fn, dtype, bias, lead, ignore, _flags = SPELLINGS[name]
    h, w, *rest = inputs(5, DTYPES[dtype], seed=len(name), bias=bool(bias), lead=lead, ignore=ignore)
    if fn is HEAD:  # the module holds its own weight and bias
        return fn, (h, rest[-1])
    return fn, (h, w, *rest)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_found(name, cache_dir):
    fn, args = _spelling_inputs(name)
    found = explain(fn, args, cache_dir)
    assert [i.status for i in found] == ["miss"], [(i.status, i.reason) for i in found]
    _fn, dtype, _bias, lead, _ignore, flags = SPELLINGS[name]
    assert found[0].flags == {**DEFAULT_FLAGS, **flags} and found[0].dtype == dtype
    rows = 5 * (lead[0] if lead else 1)
    assert tuple(found[0].shape) == (rows, H)
    # The loss is linear_cross_entropy's: no cross_entropy instance is reported besides it.
    assert explain(fn, args, cache_dir, "cross_entropy") == []


def _check_against_reference(name: str, fn, args, out, dtype: torch.dtype) -> None:
    """``out`` (the compiled fn's output on ``args``) and the gradients it gives against the float64 reference
    of the chunked driver's math (``linear_cross_entropy_reference``)."""
    _fn, _dtype, _bias, _lead, ignore, flags = SPELLINGS[name]
    flags = {**DEFAULT_FLAGS, **flags}
    loss = out[0] if isinstance(out, tuple) else out
    if fn is HEAD:
        h, y = args
        w, b = HEAD.lm_head.weight, HEAD.lm_head.bias
    else:
        h, w, *rest = args
        b, y = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    if name == "hf_causal_lm":  # the shift happens outside the pattern
        y = F.pad(y, (0, 1), value=-100)[..., 1:]
    dloss = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss.dtype)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, dloss)
    ref = linear_cross_entropy_reference(h, w, b, y, ignore, flags["label_smoothing"], flags["reduction"], dloss,
                                         keep_logits=True, chunk_rows=3)
    assert loss.dtype == (torch.float32 if flags["upcast"] else dtype)
    assert_close(loss, ref["loss"], loss.dtype if loss.dtype == torch.float32 else dtype, f"{name}: loss")
    if isinstance(out, tuple):
        assert not out[1].requires_grad  # the kept logits carry no gradient
        assert out[1].dtype == dtype
        assert_close(out[1], ref["logits"], dtype, f"{name}: logits")
    by_name = dict(zip(("dx", "dw", "db"), (h, w, b), strict=True))
    for (what, t), g in zip(((k, v) for k, v in by_name.items() if v is not None and v.requires_grad), grads,
                            strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, ref[what], dtype, f"{name}: {what}")


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_rewritten_matches_reference(name, cache_dir, rewritten):
    fn, args = _spelling_inputs(name)
    hits = make_hits(fn, args, cache_dir)
    assert [i.status for i in hits] == ["hit"], [(i.status, i.reason) for i in hits]
    out = compiled(fn, cache_dir)(*args)
    _check_against_reference(name, fn, args, out, DTYPES[SPELLINGS[name][1]])
    assert [len(c) for c in rewritten.calls] == [1]
    # The backward asks for the gradients of h and W (and the bias): all of them computed in the forward.
    call = rewritten.calls[0][0]
    assert call.target is torch.ops.autokernel.linear_cross_entropy_train.default
    assert call.args[9:12] == (True, True, name in ("linear_bias_smooth", "module_sum_ignore3"))


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_weight_or_hidden_states(frozen, cache_dir, rewritten):
    """A frozen lm_head costs no dW (a frozen trunk no dh): the op is told which gradients autograd wants."""
    grad = (frozen != "hidden", frozen != "weight", True)
    h, w, y = inputs(6, torch.bfloat16, seed=7, grad=grad)
    make_hits(upcast_mean, (h, w, y), cache_dir)
    out = compiled(upcast_mean, cache_dir)(h, w, y)
    leaf = w if frozen == "hidden" else h
    (g,) = torch.autograd.grad(out, [leaf])
    ref = linear_cross_entropy_reference(h, w, None, y, -100, 0.0, "mean", torch.ones(()))
    assert_close(g, ref["dw" if frozen == "hidden" else "dx"], torch.bfloat16, "grad")
    assert rewritten.calls[0][0].args[9:12] == (grad[0], grad[1], False)


def test_forward_only_op_under_no_grad(cache_dir, rewritten):
    fn, args = _spelling_inputs("hf_causal_lm")
    make_hits(fn, args, cache_dir)
    with torch.no_grad():
        loss, logits = compiled(fn, cache_dir)(*args)
    ref_loss, ref_logits = fn(*(a.detach() for a in args))
    assert_close(loss, ref_loss.double(), torch.float32, "no_grad loss")
    assert torch.equal(logits, ref_logits)
    assert [c[0].target for c in rewritten.calls] == [torch.ops.autokernel.linear_cross_entropy.default]


def test_dynamic_rows(cache_dir, rewritten):
    """dynamic=True: one graph serves two numbers of rows (the op reads the actual shape)."""
    h, w, b, y = inputs(5, torch.float32, seed=3, bias=True, lead=(2,))
    make_hits(linear_bias_smooth, (h, w, b, y), cache_dir)
    fn = compiled(linear_bias_smooth, cache_dir, dynamic=True)
    for rows in (5, 3):
        args = (h[:, :rows].detach().clone().requires_grad_(True), w, b, y[:, :rows].clone())
        _check_against_reference("linear_bias_smooth", linear_bias_smooth, args, fn(*args), torch.float32)
    assert [len(c) for c in rewritten.calls] == [1]


# ---------------------------------------------------------------- declines


def z_loss(h, w, y):
    logits = h @ w.T
    return F.cross_entropy(logits, y) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()


def scaled_addmm(h, w, b, y):
    return F.cross_entropy(torch.addmm(b, h, w.t(), beta=0.5), y)


def untransposed(h, w, y):
    return F.cross_entropy(h @ w.T.contiguous(), y)


DECLINES = {
    "z_loss": (z_loss, False, "logits are also read by"),
    "scaled_addmm": (scaled_addmm, True, "addmm with alpha or beta"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declined_with_reason_and_left_to_cross_entropy(name, cache_dir, rewritten):
    fn, bias, reason = DECLINES[name]
    args = inputs(5, torch.float32, seed=11, bias=bias)
    found = explain(fn, args, cache_dir)
    assert [i.status for i in found] == ["declined"], [(i.status, i.reason) for i in found]
    assert reason in found[0].reason
    # The loss alone is still the cross_entropy family's.
    assert [i.status for i in explain(fn, args, cache_dir, "cross_entropy")] == ["miss"]
    out = compiled(fn, cache_dir)(*args)
    torch.testing.assert_close(out, fn(*args))
    assert rewritten.calls == [[]]


def test_untransposed_weight_is_not_matched(cache_dir):
    args = inputs(5, torch.float32, seed=2)
    assert explain(untransposed, args, cache_dir) == []
    assert [i.status for i in explain(untransposed, args, cache_dir, "cross_entropy")] == ["miss"]


def test_symbolic_vocabulary_declined(cache_dir):
    h, w, y = inputs(5, torch.float32, seed=4)
    torch._dynamo.mark_dynamic(w, 0)
    found = explain(upcast_mean, (h, w, y), cache_dir)
    assert [i.reason for i in found] == ["symbolic vocabulary size (the cache keys on it)"]


def test_tiny_llama_head_found_with_logits_kept(cache_dir):
    """transformers' LlamaForCausalLM: the lm_head and ForCausalLMLoss make one instance; the logits it returns
    are kept as the op's side output."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=96, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    report = autokernel.explain(model, input_ids=ids, labels=ids, options={"autokernel.cache_dir": cache_dir})
    found = [i for i in report.instances if i.pattern == "linear_cross_entropy"]
    assert [(i.status, i.flags["logits_out"], i.flags["vocab"], tuple(i.shape)) for i in found] == [
        ("miss", True, 96, (16, 32))], str(report)
    assert "modeling_llama.py" in found[0].source or "loss_utils.py" in found[0].source
    assert not [i for i in report.instances if i.pattern == "cross_entropy"]
    assert "linear_cross_entropy" in str(report) and "logits_out=True" in str(report)


# ---------------------------------------------------------------- the chunked driver


def _driver_check(rows, vocab, hidden, dtype, reduction, *, bias=False, smoothing=0.0, ignore=-100,
                  all_ignored=False, config=SMALL):
    g = torch.Generator().manual_seed(rows * 31 + vocab)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.6).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[2::5] = ignore
    if all_ignored:
        y[:] = ignore
    dloss = torch.randn((rows,) if reduction == "none" else (), generator=g)
    grads = Grads(True, True, bias)
    fwd = linear_cross_entropy(x, w, b, y, ignore, smoothing, reduction, torch.float32, config, keep_logits=True)
    if reduction == "none":
        r = linear_cross_entropy(x, w, b, y, ignore, smoothing, reduction, torch.float32, config, grads=grads,
                                 dloss_rows=dloss)
        got = {"dx": r.dx, "dw": r.dw, "db": r.db}
    else:
        r = linear_cross_entropy(x, w, b, y, ignore, smoothing, reduction, torch.float32, config, grads=grads)
        got = {"dx": r.dx * dloss, "dw": r.dw * dloss, "db": r.db * dloss if bias else None}
    ref = linear_cross_entropy_reference(x, w, b, y, ignore, smoothing, reduction, dloss, keep_logits=True)
    assert_close(fwd.loss, ref["loss"], torch.float32, "loss")
    if reduction != "none":  # the training pass's own loss (its kernel launch differs from the forward's)
        assert_close(r.loss, ref["loss"], torch.float32, "training pass loss")
    assert_close(fwd.logits, ref["logits"], dtype, "logits")
    for name in ("dx", "dw") + (("db",) if bias else ()):
        assert got[name].dtype == dtype
        assert_close(got[name], ref[name], dtype, name)
    return fwd.loss, got


@pytest.mark.parametrize("rows,vocab,hidden", [(1, 37, 8), (11, 129, 12), (8, 300, 5)])
def test_driver_awkward_shapes(rows, vocab, hidden):
    """1 row; rows not a multiple of the chunk (4) and a vocabulary not a power of two; a vocabulary wider than
    the kernel's blocks."""
    _driver_check(rows, vocab, hidden, torch.bfloat16, "mean", bias=True, smoothing=0.1)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_driver_reductions_and_ignore_index(reduction):
    _driver_check(9, 50, 8, torch.float32, reduction, ignore=4, smoothing=0.2)


def test_driver_every_row_ignored():
    loss, got = _driver_check(6, 30, 8, torch.float32, "mean", bias=True, all_ignored=True)
    assert loss.isnan()
    assert all(torch.equal(t, torch.zeros_like(t)) for t in got.values())


def test_driver_is_deterministic_and_computes_only_what_is_asked():
    x = torch.randn(10, 8).to(torch.bfloat16)
    w = torch.randn(70, 8).to(torch.bfloat16)
    y = torch.randint(0, 70, (10,))
    first, again = (linear_cross_entropy(x, w, None, y, -100, 0.0, "mean", torch.float32, SMALL,
                                         grads=Grads(True, True, False)) for _ in range(2))
    for a, b in zip(first, again, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    only_dw = linear_cross_entropy(x, w, None, y, -100, 0.0, "mean", torch.float32, SMALL,
                                   grads=Grads(False, True, False))
    assert only_dw.dx is None and only_dw.logits is None and only_dw.db is None
    assert torch.equal(only_dw.dw, first.dw)


@pytest.mark.parametrize("reduction,bias,smoothing,dtype", [("mean", True, 0.1, torch.bfloat16),
                                                             ("sum", False, 0.0, torch.float32)])
def test_training_over_kept_logits(reduction, bias, smoothing, dtype):
    """With the logits kept (HF returns them), training writes them whole, then forms the gradient one slice of
    the vocabulary at a time (32 columns: two whole slices and a partial one): the reference's loss, logits
    and gradients, the row-chunked pass's within the tolerance, and bitwise the same on a second run."""
    g = torch.Generator().manual_seed(7)
    rows, vocab, hidden = 11, 70, 12
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.6).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[2::5] = -100
    y[0] = vocab - 1  # a label in the last, partial slice
    sliced = dataclasses.replace(SMALL, train_slice_cols=32)
    grads = Grads(True, True, bias)
    kept, again = (linear_cross_entropy(x, w, b, y, -100, smoothing, reduction, torch.float32, sliced, grads=grads,
                                        keep_logits=True) for _ in range(2))
    ref = linear_cross_entropy_reference(x, w, b, y, -100, smoothing, reduction, torch.ones(()), keep_logits=True)
    plain = linear_cross_entropy(x, w, b, y, -100, smoothing, reduction, torch.float32, sliced, grads=grads)
    assert_close(kept.loss, ref["loss"], torch.float32, "loss")
    assert_close(kept.logits, ref["logits"], dtype, "logits")
    for name in ("dx", "dw") + (("db",) if bias else ()):
        got = getattr(kept, name)
        assert got.dtype == dtype
        assert_close(got, ref[name], dtype, name)
        assert_close(got, getattr(plain, name), dtype, f"{name} against the row-chunked pass")
    for a, b2 in zip(kept, again, strict=True):
        assert (a is None and b2 is None) or torch.equal(a, b2)


def test_default_config_sizes_the_chunk_by_bytes():
    # 1024 rows of a 128256 bf16 vocabulary (250.5 MiB) where dW leaves little of the 1.4 GiB budget (hidden
    # 4096); twice that where it leaves room (hidden 2048: 2048 rows; a 32000 vocabulary: 8320 rows, 507 MiB).
    assert default_config(8192, 4096, 128256, torch.bfloat16).train_chunk_rows == 1024
    assert default_config(8192, 2048, 128256, torch.bfloat16).train_chunk_rows == 2048
    assert default_config(8192, 4096, 32000, torch.bfloat16).train_chunk_rows == 8320
    assert max_chunk_bytes(8192, 4096, 128256, 2) + (128256 + 8192) * 4096 * 2 <= 1.4 * 2**30


def test_candidate_chunks_stay_in_the_memory_budget():
    from autokernel.lowering.linear_cross_entropy.problem import LinearCrossEntropyProblem

    for hidden, most in ((2048, 3584), (4096, 1408)):
        problem = LinearCrossEntropyProblem({"vocab": 128256}, "bf16", [8192, hidden], "cpu")
        order = [c["train_chunk_rows"] for phase, c in problem.candidates()
                 if phase == "bwd" and c["train_chunk_rows"] != problem.default_candidate()["train_chunk_rows"]]
        assert order == sorted(order, reverse=True) and order[0] == most, order  # the largest timed first
        chunks = {c["train_chunk_rows"] for phase, c in problem.candidates() if phase == "bwd"}
        assert max(chunks) == most, chunks
        grads = (128256 + 8192) * hidden * 2
        assert max(chunks) * 128256 * 2 + grads <= 1.4 * 2**30 + 128 * 128256 * 2  # within one row tile
    # Where the logits are kept, the gradient slices' widths: under the same cap, the default among them.
    kept = LinearCrossEntropyProblem({"vocab": 128256, "logits_out": True}, "bf16", [8192, 2048], "cpu")
    slices = {c["train_slice_cols"] for phase, c in kept.candidates() if phase == "bwd"}
    assert slices == {2048, 4096, 8192, 16384, 32768} and kept.default_candidate()["train_slice_cols"] == 16384
    assert max(slices) * 8192 * 2 + (128256 + 8192) * 2048 * 2 <= 1.4 * 2**30
    assert {c["train_slice_cols"] for _, c in problem.candidates()} == {problem.default_candidate()["train_slice_cols"]}
    with pytest.raises(ValueError, match="train_slice_cols must be > 0"):
        LinearCrossEntropyConfig(train_slice_cols=0)
    with pytest.raises(ValueError, match="train_chunk_rows must be > 0"):
        LinearCrossEntropyConfig(train_chunk_rows=0)
    with pytest.raises(ValueError, match="fwd_block_n must be a power of two"):
        LinearCrossEntropyConfig(fwd_block_n=100)


def test_bad_inputs_are_named():
    x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels hold 3 elements for 4 rows"):
        linear_cross_entropy(x, w, None, y[:3], -100, 0.0, "mean", torch.float32, SMALL)
    with pytest.raises(ValueError, match=r"x \[..., H\] and weight \[V, H\] expected"):
        linear_cross_entropy(x, w[:, :5], None, y, -100, 0.0, "mean", torch.float32, SMALL)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(x, w, torch.zeros(9), y, -100, 0.0, "mean", torch.float32, SMALL)
    with pytest.raises(ValueError, match="reduction 'none' computes gradients only from dloss_rows"):
        linear_cross_entropy(x, w, None, y, -100, 0.0, "none", torch.float32, SMALL, grads=Grads(True, False, False))


def test_opcheck():
    ops = torch.ops.autokernel
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, 8, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(24, dtype=torch.bfloat16, requires_grad=True)
    y = torch.tensor([[1, -100, 3], [23, 0, 5]])
    # The forward-only op has no autograd formula: it serves graphs that need no gradient.
    torch.library.opcheck(ops.linear_cross_entropy, (x.detach(), w.detach(), b.detach(), y, -100, 0.1, "mean",
                                                     torch.float32, True, ""))
    torch.library.opcheck(ops.linear_cross_entropy_train, (x, w, None, y, -100, 0.0, "sum", torch.bfloat16, False,
                                                           True, True, False, ""))
    torch.library.opcheck(ops.linear_cross_entropy_train, (x, w, b, y, -100, 0.0, "none", torch.float32, True,
                                                           True, False, True, ""))
    torch.library.opcheck(ops.linear_cross_entropy_backward, (torch.randn(6), x.detach(), w.detach(), b.detach(), y,
                                                              -100, 0.0, torch.float32, True, True, True, ""))


# ---------------------------------------------------------------- ak-tune


def test_ak_tune_writes_an_entry_that_hits(cache_dir):
    from autokernel.playbook.tuner import TuneRequest, tune

    args = inputs(7, torch.bfloat16, seed=1)
    assert [i.status for i in explain(upcast_mean, args, cache_dir)] == ["miss"]
    cache = KernelCache(cache_dir, device="cpu")
    try:
        # --shape tokens x hidden x vocab, the flags as the command line gives them (strings)
        result = tune(TuneRequest("linear_cross_entropy", {"upcast": "1"}, "bf16", [7, H, V]), cache,
                      torch.device("cpu"), budget_s=120)
    finally:
        cache.close()
    assert result.status == "written", result.detail
    assert [i.status for i in explain(upcast_mean, args, cache_dir)] == ["hit"]


def test_floor_counts_the_matmuls():
    """The tuner's floor for linear + CE is its FLOPs at the measured matmul rate when that exceeds the DRAM floor
    (the Amdahl ranking of a Llama step put it at 0.76 ms for an op whose matmuls need 18.5 ms)."""
    from autokernel.lowering.linear_cross_entropy.problem import LinearCrossEntropyProblem
    from autokernel.playbook.tuner import measure_baseline

    class Rates:
        def call(self, kind):
            if kind == "bandwidth":
                return {"status": "ok", "copy_gbps": 4000.0, "matmul_tflops": 700.0}
            return {"status": "ok", "fwd_ms": 7.5, "train_ms": 21.0}

    problem = LinearCrossEntropyProblem({"vocab": 128256}, "bf16", [8192, 2048], "cpu")
    floor, peer, detail = measure_baseline(Rates(), problem)
    assert detail == "" and peer == {"fwd_ms": 7.5, "train_ms": 21.0}
    matmul_ms = 2 * 8192 * 2048 * 128256 / 700e12 * 1e3
    assert floor["fwd"] == pytest.approx(matmul_ms) and floor["train"] == pytest.approx(3 * matmul_ms)
    dram_only = {k: v / 4000e9 * 1e3 for k, v in problem.bytes_moved().items()}
    assert all(floor[k] > dram_only[k] for k in floor)
