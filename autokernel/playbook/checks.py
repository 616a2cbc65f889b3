"""The checks every candidate passes, in order, before it is timed.

1. smoke: it runs on the target shape and writes finite outputs;
2. shape sweep: 1 row, awkward row counts, a non-power-of-two width, the target rows;
3. numerical stability: large and small magnitudes, a row of exact zeros;
4. determinism: two runs on the target shape are bitwise equal;
5. edge cases: non-contiguous inputs, a zero-size batch.

Forward and backward outputs alike are compared with a float64 reference through the one tolerance
table (:mod:`autokernel.playbook.tolerances`). The problem supplies cases, references and runs; this
module knows nothing of any pattern's math.

On CUDA the smoke stage runs the target and every sweep case at once, in threads: each distinct
specialization (a width that is not a multiple of 16, say) is a compile of its own, and Triton's compile
releases the GIL, so the compiles overlap instead of queuing behind each other. The kernels still run one
after another on the one stream, and the stages still judge in order. A case that runs out of memory beside
the others runs again alone. Under the interpreter, whose launch state is global, the cases run one by one.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.playbook.tolerances import assert_close

STAGES = ("smoke", "shape sweep", "stability", "determinism", "edge cases")


class CheckFailed(Exception):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


def _compare(problem: Any, outputs: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], stage: str,
             label: str) -> None:
    if set(outputs) != set(ref):
        raise CheckFailed(stage, f"{label}: outputs {sorted(outputs)} != reference's {sorted(ref)}")
    for name, expected in ref.items():
        try:
            assert_close(outputs[name], expected, problem.tolerance_dtype(name), f"{label} {name}")
        except AssertionError as exc:
            raise CheckFailed(stage, str(exc)) from None


def _run_all(problem: Any, config: dict[str, Any], cases: list[Any]) -> list[Any]:
    """``problem.run(config, case)`` for each case: its outputs, or the exception it raised. Concurrent on
    CUDA (see the module docstring), in order elsewhere."""

    def run(case: Any) -> Any:
        try:
            # A new thread starts on CUDA device 0, and Triton launches on the current device.
            pinned = problem.device.type == "cuda" and problem.device.index is not None
            with torch.cuda.device(problem.device) if pinned else contextlib.nullcontext():
                return problem.run(config, case)
        except Exception as exc:
            return exc

    if problem.device.type != "cuda" or len(cases) == 1:
        return [run(case) for case in cases]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        runs = list(pool.map(run, cases))
    # Together the cases hold every case's buffers at once (a linear + cross-entropy's logits are GiBs each):
    # a case that ran out of memory beside the others runs again alone, after the others' blocks are freed.
    for i, got in enumerate(runs):
        if isinstance(got, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            runs[i] = run(cases[i])
    return runs


@dataclass
class CheckCases:
    """Every input the checks run a candidate on: built in one place, so the precompiler
    (:mod:`autokernel.playbook.precompile`) compiles for exactly the shapes and strides the checks launch."""

    rows: int
    hidden: int
    target: Any
    sweep: list[tuple[str, Any]]  # (label, case): 1 row, awkward row counts, a non-power-of-two width
    stability: list[tuple[str, Any]]  # large and small magnitudes, a row of exact zeros
    noncontiguous: Any
    empty: Any  # a zero-size batch

    def all(self) -> list[Any]:
        return [self.target, *(c for _l, c in self.sweep), *(c for _l, c in self.stability), self.noncontiguous,
                self.empty]


def check_cases(problem: Any, max_rows: int | None = None) -> CheckCases:
    """The cases :func:`run_checks` runs, for ``problem`` at its target shape (rows capped at ``max_rows``)."""
    rows, hidden = problem.target_shape(max_rows)
    small = min(rows, 257)
    return CheckCases(
        rows, hidden, problem.case(rows, hidden),
        sweep=[(f"{r}x{h}", problem.case(r, h, seed=1)) for r, h in problem.sweep_shapes(max_rows)],
        stability=[*((f"scale {scale:g}", problem.case(small, hidden, scale=scale, seed=2)) for scale in (1e4, 1e-3)),
                   ("zero row", problem.case(small, hidden, zero_row=True, seed=3))],
        noncontiguous=problem.case(min(rows, 64), hidden, noncontiguous=True, seed=4),
        empty=problem.case(0, hidden, seed=5))


def run_checks(problem: Any, config: dict[str, Any], max_rows: int | None = None,
               seconds: dict[str, float] | None = None) -> list[str]:
    """Run the stages in order; raise :class:`CheckFailed` at the first failure, else return their names.
    ``seconds``, when given, receives the wall time of the smoke stage (``"smoke"``: the candidate's first
    runs, so its kernels' compiles, the sweep's included) and of the other stages together (``"checks"``):
    where a candidate's time goes, for the search's rate."""
    start = time.perf_counter()
    cases = check_cases(problem, max_rows)
    rows, hidden, target = cases.rows, cases.hidden, cases.target
    runs = _run_all(problem, config, [target] + [case for _label, case in cases.sweep])
    out = runs[0]
    if isinstance(out, Exception):
        raise CheckFailed("smoke", f"{type(out).__name__}: {out}") from None
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise CheckFailed("smoke", f"{name} has non-finite values on {rows}x{hidden}")
    smoke_end = time.perf_counter()

    for (label, case), got in zip(cases.sweep, runs[1:], strict=True):
        if isinstance(got, Exception):
            raise got  # not a check failure: the worker reports it as an error, with its traceback
        _compare(problem, got, problem.reference(case), "shape sweep", label)

    for label, case in cases.stability:
        _compare(problem, problem.run(config, case), problem.reference(case), "stability", label)

    first = problem.run(config, target)
    again = problem.run(config, target)
    for name in first:
        if not torch.equal(first[name], again[name]):
            raise CheckFailed("determinism", f"{name} differs between two runs on {rows}x{hidden}")

    case = cases.noncontiguous
    _compare(problem, problem.run(config, case), problem.reference(case), "edge cases", "non-contiguous")
    try:
        out = problem.run(config, cases.empty)
    except Exception as exc:
        raise CheckFailed("edge cases", f"zero-size batch: {type(exc).__name__}: {exc}") from None
    for name, t in out.items():
        # Parameter grads keep their shape, and so does a loss reduced to a scalar.
        if name not in ("dw", "db") and t.dim() > 0 and t.numel() != 0:
            raise CheckFailed("edge cases", f"zero-size batch gave {name} of shape {tuple(t.shape)}")
    if seconds is not None:
        seconds.update(smoke=smoke_end - start, checks=time.perf_counter() - smoke_end)
    return list(STAGES)
