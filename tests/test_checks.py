"""The check stages' runner: the smoke stage's cases run concurrently on CUDA, one by one elsewhere."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from autokernel.playbook import checks


class _SleepyProblem:
    """Each run sleeps (as a compile releases the GIL) and records its thread; case 2 raises."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.threads: set[int] = set()

    def run(self, config, case):
        self.threads.add(threading.get_ident())
        time.sleep(0.3)
        if case == 2:
            raise RuntimeError("case 2 does not compile")
        return {"y": torch.full((1,), float(case))}


def test_cases_run_concurrently_on_cuda_and_keep_their_order_and_errors():
    # The device only selects the path: no CUDA call is made for a device without an index.
    problem = _SleepyProblem("cuda")
    start = time.perf_counter()
    runs = checks._run_all(problem, {}, [0, 1, 2, 3, 4])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"5 runs of 0.3 s took {elapsed:.2f} s: not concurrent"
    assert len(problem.threads) > 1
    assert [r["y"].item() for i, r in enumerate(runs) if i != 2] == [0.0, 1.0, 3.0, 4.0]
    assert isinstance(runs[2], RuntimeError) and "case 2" in str(runs[2])


class _CrowdedProblem:
    """Runs out of memory while another case runs beside it; alone, every case fits."""

    device = torch.device("cuda")

    def __init__(self):
        self.running, self.alone, self.calls = 0, [], []
        self.lock = threading.Lock()

    def run(self, config, case):
        with self.lock:
            self.calls.append(case)
            self.running += 1
            crowded = self.running > 1
        try:
            time.sleep(0.2)
            if crowded and case == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if not crowded:
                self.alone.append(case)
            return {"y": torch.full((1,), float(case))}
        finally:
            with self.lock:
                self.running -= 1


def test_a_case_out_of_memory_beside_the_others_runs_again_alone():
    problem = _CrowdedProblem()
    runs = checks._run_all(problem, {}, [0, 1, 2])
    assert [r["y"].item() for r in runs] == [0.0, 1.0, 2.0]
    assert problem.calls.count(1) == 2  # out of memory beside the others, then again
    assert problem.alone[-1] == 1  # the rerun, after the pool (case 0 may have started before the others)


def test_cases_run_one_by_one_off_cuda():
    problem = _SleepyProblem("cpu")
    runs = checks._run_all(problem, {}, [0, 1, 2])
    assert len(problem.threads) == 1
    assert isinstance(runs[2], RuntimeError) and runs[1]["y"].item() == 1.0


class _TinyProblem:
    """A problem with the row problems' interface whose run fails on chosen shapes."""

    device = torch.device("cpu")
    max_rows = None

    def __init__(self, fail_on=None, error_on=None):
        self.fail_on, self.error_on = fail_on, error_on

    def target_shape(self, max_rows):
        return 8, 6

    def sweep_shapes(self, max_rows):
        return [(1, 6), (3, 5), (8, 6)]

    def case(self, rows, hidden, seed=0, scale=1.0, zero_row=False, noncontiguous=False):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(rows, hidden, generator=g, dtype=torch.float64) * scale

    def run(self, config, case):
        if tuple(case.shape) == self.error_on:
            raise ValueError("bad launch")
        y = case * 2
        if tuple(case.shape) == self.fail_on:
            y = y + 1
        return {"y": y}

    def reference(self, case):
        return {"y": case * 2}

    def tolerance_dtype(self, name):
        return torch.float32


def test_run_checks_judges_the_smoke_and_sweep_in_order():
    assert checks.run_checks(_TinyProblem(), {}) == list(checks.STAGES)
    with pytest.raises(checks.CheckFailed, match="shape sweep: 3x5"):
        checks.run_checks(_TinyProblem(fail_on=(3, 5)), {})
    # A launch that raises on the target is the smoke stage's failure; on a sweep case, an error (not a
    # check failure) that the worker reports with its traceback.
    with pytest.raises(checks.CheckFailed, match="smoke: ValueError: bad launch"):
        checks.run_checks(_TinyProblem(error_on=(8, 6)), {})
    with pytest.raises(ValueError, match="bad launch"):
        checks.run_checks(_TinyProblem(error_on=(3, 5)), {})
