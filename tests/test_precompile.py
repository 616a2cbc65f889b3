"""ak-tune's precompiler: compiler processes that build the next candidates' kernels ahead of the worker.

On this CPU machine the compiles themselves cannot happen (the interpreter compiles nothing, and meta tensors
cannot be interpreted): these tests hold the plumbing to account (a request answered, nothing queued twice, a
dead compiler costing nothing, a retarget, a clean stop). ``test_gpu_precompile.py`` checks on CUDA that a
precompiled candidate compiles nothing in the worker."""

from __future__ import annotations

import time

import torch

from autokernel.playbook.precompile import IN_FLIGHT, Precompiler, check_cases, compilers
from autokernel.playbook.tuner import TuneRequest, Worker

FLAGS = {"mode": "llama", "offset": 0.0, "weight": "fp32", "out": "fp32"}
ARGS = {"pattern": "rms_norm", "flags": FLAGS, "dtype": "fp32", "shape": [4, 32], "device": "cpu", "max_rows": 8,
        "passes": ["fwd", "train"]}


def _settled(pre: Precompiler, config: dict, timeout_s: float = 120.0) -> str | None:
    deadline = time.time() + timeout_s
    while (state := pre.state(config)) == "pending" and time.time() < deadline:
        time.sleep(0.1)
    return state


def test_a_request_is_answered_once_and_never_queued_twice():
    pre = Precompiler(ARGS, 1)
    config = {"fwd_num_warps": 1, "bwd_num_warps": 1}
    try:
        assert pre.state(config) is None
        pre.ahead([config])
        assert pre.state(config) == "pending"
        # The interpreter cannot run meta tensors: the compiler answers with an error, which only marks the
        # config (the worker would compile it for itself).
        assert _settled(pre, config) == "failed"
        pre.ahead([config])
        assert pre.in_flight == [[]], "a config answered before was queued again"
    finally:
        pre.stop()
    assert pre.children == []


def test_compilers_take_no_more_than_their_room():
    pre = Precompiler(ARGS, 2)
    configs = [{"fwd_num_warps": w, "bwd_num_warps": 1} for w in (1, 2, 4, 8, 16, 32)]
    try:
        pre.ahead(configs)
        queued = [c for c in configs if pre.state(c) is not None]
        assert len(queued) <= 2 * IN_FLIGHT
        assert queued == configs[:len(queued)], "the loop's order was not kept"
    finally:
        pre.stop()


def test_a_dead_compiler_is_never_sent_work_again():
    pre = Precompiler(ARGS, 1)
    first, second = {"fwd_num_warps": 1}, {"fwd_num_warps": 2}
    try:
        pre.ahead([first])
        proc = pre.children[0][0]
        proc.kill()
        proc.wait(10)
        pre.ahead([second])  # the write to the dead pipe fails, or the answer never comes: no exception here
        assert pre.state(second) is None or 0 in pre.dead
        pre.ahead([{"fwd_num_warps": 4}])
        assert 0 in pre.dead
        assert pre.state({"fwd_num_warps": 4}) is None
    finally:
        pre.stop()


def test_retarget_forgets_the_old_problem_s_states():
    pre = Precompiler(ARGS, 1)
    config = {"fwd_num_warps": 1}
    try:
        pre.ahead([config])
        _settled(pre, config)
        pre.retarget({**ARGS, "shape": [4, 48]})
        assert pre.state(config) is None
        pre.ahead([config])  # queued again: it is another problem's compile now
        assert _settled(pre, config) == "failed"
    finally:
        pre.stop()


def test_the_precompiler_runs_every_case_the_checks_run():
    """Its list of cases is the checks' own (``check_cases``), target, sweep, stability and edge cases."""
    from autokernel.lowering import families

    problem = families()["rms_norm"].problem(FLAGS, "fp32", [300, 40], "meta")
    cases = check_cases(problem, None)
    shapes = {tuple(c.x.shape) for c in cases.all()}
    assert {(300, 40), (1, 40), (3, 40), (130, 40), (1, 39), (257, 40), (64, 40), (0, 40)} <= shapes
    assert not cases.noncontiguous.x.is_contiguous()


def test_no_precompiler_off_cuda_and_the_default_count():
    worker = Worker(TuneRequest("rms_norm", FLAGS, "fp32", [4, 32]), torch.device("cpu"), 8, 60, precompile=4)
    assert worker.precompiler is None and worker.precompiled({"fwd_num_warps": 1}) == ""
    assert compilers(0) == 0 and compilers(3) == 3
    assert 1 <= compilers() <= 4


def test_upcoming_follows_the_loop():
    """What the tuner offers the precompiler: the next candidates of phases still running, each backward one with
    the forward knobs it will run with, at most LOOKAHEAD of them."""
    from autokernel.playbook.tuner import LOOKAHEAD, PLATEAU, _upcoming

    fwd = [("fwd", {"fwd_num_warps": w}, "search") for w in (1, 2)]
    bwd = [("bwd", {"fwd_num_warps": 0, "bwd_num_warps": w}, "search") for w in range(1, 2 * LOOKAHEAD)]
    got = _upcoming(fwd + bwd, {"fwd": 0, "bwd": 0}, {"fwd_num_warps": 8, "bwd_num_warps": 99})
    assert got[:2] == [{"fwd_num_warps": 1}, {"fwd_num_warps": 2}]
    assert got[2] == {"fwd_num_warps": 8, "bwd_num_warps": 1}
    assert len(got) == LOOKAHEAD
    ended = _upcoming(fwd + bwd, {"fwd": PLATEAU, "bwd": 0}, {"fwd_num_warps": 8})
    assert all("bwd_num_warps" in c for c in ended)


FAMILY_CASES = [
    ("rms_norm", {"mode": "gemma", "offset": 1.0}, [300, 40]),
    ("rms_norm", {"residual": True}, [300, 40]),
    ("layer_norm", {}, [300, 40]),
    ("softmax", {"op": "log_softmax"}, [300, 40]),
    ("swiglu", {"act": "gelu_tanh", "layout": "gate_up"}, [300, 48]),
    ("cross_entropy", {"reduction": "none", "ignore_index": 3}, [300, 100]),
    ("linear_cross_entropy", {"reduction": "sum"}, [300, 16, 40]),
    ("rope", {"layout": "interleaved", "rotary_dim": 8, "kv_heads": 2}, [2, 4, 8, 16]),
]


def _layouts(value) -> list:
    """(size, stride, dtype) of every tensor a case holds, in field order; other fields as they are."""
    import dataclasses

    fields = [getattr(value, f.name) for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [value]
    return [(tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v for v in fields]


def test_meta_random_cases_have_the_exact_layouts(monkeypatch):
    """The compilers draw their cases with ``meta_random`` (no data): every family's cases must come out with the
    sizes, strides and dtypes of the cases drawn on the CPU, which is what Triton specializes on; and no family may
    need the slow path (it would still be right, only late)."""
    from autokernel.lowering import families
    from autokernel.playbook.precompile import meta_random

    for pattern, flags, shape in FAMILY_CASES:
        exact = check_cases(families()[pattern].problem(flags, "bf16", shape, "meta"), 64)
        with meta_random():
            fast = check_cases(families()[pattern].problem(flags, "bf16", shape, "meta"), 64)
        assert torch.randn(2).device.type == "cpu", "meta_random leaked out of its block"
        for a, b in zip(exact.all(), fast.all(), strict=True):
            assert _layouts(a) == _layouts(b), pattern
