"""One worker child process for many requests: a ranking's, and a device's jobs in ak-tune's pool."""

from __future__ import annotations

import time

import pytest
import torch

from autokernel.cache import KernelCache
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook import model, pool
from autokernel.playbook.tuner import TuneRequest, Worker, WorkerStartFailure

FLAGS = {"mode": "llama", "offset": 0.0, "weight": "fp32", "out": "fp32"}
CPU = torch.device("cpu")


def _request(hidden: int, rows: int = 4) -> TuneRequest:
    return TuneRequest("rms_norm", FLAGS, "fp32", [rows, hidden])


def test_retarget_swaps_the_problem_in_the_same_child():
    worker = Worker(_request(32), CPU, 8, timeout_s=120)
    try:
        config = {"fwd_num_warps": 1, "bwd_num_warps": 1}
        assert worker.call("candidate", config)["status"] == "ok"
        pid = worker.proc.pid
        worker.retarget(_request(24), 8)
        reply = worker.call("candidate", config)
        assert reply["status"] == "ok" and worker.proc.pid == pid
        # The child holds the problem it was last given: a softmax knob passes there and fails for RMSNorm.
        softmax_only = {"bwd_rows_per_program": 1}
        worker.retarget(TuneRequest("softmax", {"op": "softmax", "out": "fp32"}, "fp32", [4, 24]), 8)
        assert worker.call("candidate", softmax_only)["status"] == "ok"
        worker.retarget(_request(24), 8)
        assert worker.call("candidate", softmax_only)["status"] == "failed"
        assert worker.proc.pid == pid
        # A problem the child cannot load: a start failure (no candidate's fault), the child gone; the next
        # request starts a fresh one.
        worker.retarget(TuneRequest("no_such_pattern", {}, "fp32", [4, 8]), 8)
        with pytest.raises(WorkerStartFailure, match="could not load no_such_pattern.*KeyError"):
            worker.call("bandwidth")
        assert worker.proc is None
        worker.retarget(_request(32), 8)
        assert worker.call("candidate", config)["status"] == "ok" and worker.proc.pid != pid
    finally:
        worker.stop()


def test_the_pool_runs_a_devices_jobs_in_one_child(tmp_path, monkeypatch):
    cache = KernelCache(tmp_path, device="cpu")
    for hidden in (32, 40, 48):
        cache.record_wanted("rms_norm", pattern_key("llama", 0.0, torch.float32, torch.float32, torch.float32),
                            FLAGS, "fp32", [4, hidden], hidden, 4)
    started = []
    start = Worker.start

    def counting_start(self):
        start(self)
        started.append(self.proc.pid)

    monkeypatch.setattr(Worker, "start", counting_start)
    jobs = [pool.Job(TuneRequest.from_wanted(w), key) for key, w in cache.wanted()]
    results = pool.tune_all(jobs, cache, [CPU], time.time() + 600, 120, out=lambda _line: None)
    assert sorted(r.status for r in results) == ["written"] * 3
    assert len(started) == 1


def test_rank_asks_one_child_for_every_request_and_the_bandwidth_once(monkeypatch):
    seen = []

    def fake_baseline(worker, problem, rates=None, seconds=None):
        worker.call("candidate", {"fwd_num_warps": 1, "bwd_num_warps": 1})  # the child holds this problem
        seen.append((worker.proc.pid, problem.hidden, rates))
        seconds.update(smoke=2.0, timing=0.5)
        return {"fwd": 0.001, "train": 0.002}, {"fwd_ms": 0.01, "train_ms": 0.02}, ""

    bandwidth_calls = []
    call = Worker.call

    def counting_call(self, *request):
        if request[0] == "bandwidth":
            bandwidth_calls.append(request)
        return call(self, *request)

    monkeypatch.setattr(model, "interpreter_enabled", lambda: False)  # rank times nothing under the interpreter
    monkeypatch.setattr(model, "measure_baseline", fake_baseline)
    monkeypatch.setattr(Worker, "call", counting_call)
    spent: dict[str, float] = {}
    ranked = model.rank([(_request(32), 1), (_request(40), 3), (_request(48), 2)], CPU, timeout_s=120,
                        seconds=spent)
    assert spent == {"smoke": 6.0, "timing": 1.5}  # the worker's split, summed over the requests
    assert [r.request.shape[-1] for r in ranked] == [40, 48, 32]  # by gain: count x (now - floor)
    assert len({pid for pid, _, _ in seen}) == 1 and [h for _, h, _ in seen] == [32, 40, 48]
    assert len(bandwidth_calls) == 1 and all(rates == seen[0][2] for _, _, rates in seen)


@pytest.mark.parametrize("one_run_ms", [0.005, 0.3, 9.0, 41.7, 600.0])
def test_the_timed_runs_are_never_fewer_than_the_minimum(one_run_ms):
    """do_bench repeats rep / estimate times: the rep given it holds at least MIN_TIMED_RUNS runs of the measured
    length even where the estimate comes out 10% longer, and a short op keeps the default 100 ms."""
    from autokernel.playbook.timing import MIN_TIMED_RUNS, rep_ms_for

    rep = rep_ms_for(one_run_ms, 100)
    assert rep >= 100
    assert int(rep / (one_run_ms * 1.1)) >= MIN_TIMED_RUNS
    if one_run_ms * MIN_TIMED_RUNS < 90:
        assert rep == 100
