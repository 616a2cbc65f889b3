"""The child process that checks and times candidates.

A kernel that crashes or hangs the CUDA context takes this process down, not the tuner: the tuner
notices (EOF on the pipe, or no answer before the timeout), marks the candidate, and starts a fresh
worker. Requests: ``("candidate", config)``, ``("inductor",)``, ``("in_context", entry)``,
``("bandwidth",)``, ``("problem", args)`` (hold another problem), ``("stop",)``; each answer is a dict.
"""

from __future__ import annotations

import gc
import itertools
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autokernel.cache.store import PASSES
from autokernel.playbook.checks import CheckFailed, run_checks
from autokernel.playbook.child import run_child
from autokernel.playbook.timing import copy_gbps, gpu_or_host_ms, graph_ms, matmul_tflops, median_ms

L2_ROTATE_BYTES = 128 * 2**20  # rotate among input sets until their total passes this (H100 L2: 50 MB)


def _rotating(problem: Any, passes_of, passes: Sequence[str]) -> dict[str, list[Callable[[], object]]]:
    """The named ``passes``' callables over several input sets when one fits in cache, so L2 does not flatter
    small shapes (an untimed pass is never called, so a compiled peer never compiles its backward)."""
    rows, hidden = problem.target_shape(problem.max_rows)
    per_set = max(problem.bytes_moved()["train"], 1)
    sets = max(1, min(16, L2_ROTATE_BYTES // per_set)) if problem.device.type == "cuda" else 1
    fns = [passes_of(problem.case(rows, hidden, seed=10 + i)) for i in range(sets)]
    return {name: [f[name] for f in fns] for name in passes}


def _time_passes(problem: Any, passes: dict[str, list[Callable[[], object]]]) -> dict[str, Any]:
    """Per pass, the GPU time of one call: every input set's call captured in one CUDA graph, replayed, divided
    by the number of sets. Candidates and Inductor are timed alike, so a config that wins does so on the GPU,
    not on the host's launch cost (which hides a 0.1 ms kernel's differences under ~0.2 ms of Python at small
    shapes, and which a model's other GPU work hides anyway). Off CUDA or where capture fails: the
    host-inclusive median, rotating over the sets; ``clock`` says which."""
    out: dict[str, Any] = {"clock": "gpu"}
    for name, calls in passes.items():
        ms = graph_ms(lambda calls=calls: [c() for c in calls], problem.device)
        if ms is not None:
            out[f"{name}_ms"] = ms / len(calls)
            continue
        out["clock"] = "host"
        turn = itertools.cycle(calls)
        out[f"{name}_ms"] = median_ms(lambda turn=turn: next(turn)(), problem.device)
    return out


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """The memory one call of ``fn`` takes at its peak above what was allocated before it, in MiB (what the
    tuner weighs for a pattern that trades time for memory); None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _in_context(problem: Any, entry: dict[str, Any], passes: Sequence[str]) -> dict[str, Any]:
    """``entry`` served through ``torch.compile(backend="autokernel")`` against Inductor's own compile, both
    timed the same way: the GPU time of the compiled step replayed from a CUDA graph (the host's time when
    capture fails or off CUDA). The kernels alone were timed without what the compiled step adds around them
    (layout copies, reductions of partial sums, the neighbours' kernels): this race, not the kernels' own
    times, decides the win. Each pass's peak memory beside its time (``*_peak_mib``, None off CUDA), for a
    problem that trades time for memory."""
    import autokernel
    from autokernel.cache import KernelCache

    served = {**entry, "winner": {"fwd": "autokernel", "train": "autokernel"}}
    rows, hidden = problem.target_shape(problem.max_rows)
    case = problem.case(rows, hidden)
    with tempfile.TemporaryDirectory(prefix="ak-in-context-") as root:
        KernelCache(root, device=problem.device).put_entry(served)
        options = {"autokernel.cache_dir": root, "autokernel.record_misses": False}
        calls: list[tuple] = []

        def record(*args):  # the arguments the race passes to a compiled eager function
            calls.append(args)
            return problem.eager(*args)

        problem.peer_passes(record, case)["fwd"]()
        torch._dynamo.reset()
        report = autokernel.explain(problem.eager, *calls[0], options=options)
        missed = [f"{i.pattern}: {i.status} {i.reason}".strip() for i in report.instances if i.status != "hit"]
        if missed or not report.instances:
            return {"status": "error", "detail": "the compiled pattern does not hit the tuned entry: "
                    + ("; ".join(missed) or "no pattern instance found")}
        times: dict[str, Any] = {}
        clock = "gpu"
        for impl, compiled in (("", lambda: torch.compile(problem.eager, backend="autokernel", options=options)),
                               ("inductor_", lambda: torch.compile(problem.eager))):
            torch._dynamo.reset()
            compiled_passes = problem.peer_passes(compiled(), case)
            for name in passes:
                times[f"{impl}{name}_ms"], pass_clock = gpu_or_host_ms(compiled_passes[name], problem.device)
                times[f"{impl}{name}_peak_mib"] = _peak_mib(compiled_passes[name], problem.device)
                if pass_clock == "host":
                    clock = "host"
        torch._dynamo.reset()
    return {"status": "ok", "clock": clock, **times}


def handle(problem: Any, request: tuple, passes: Sequence[str] = PASSES) -> dict[str, Any]:
    """Answer one request, timing the ``passes`` the tuner tunes (``["fwd"]`` for an inference request)."""
    kind = request[0]
    if kind == "candidate":
        config = request[1]
        seconds: dict[str, float] = {}
        try:
            checks = run_checks(problem, config, problem.max_rows, seconds)
        except CheckFailed as exc:
            return {"status": "failed", "stage": exc.stage, "detail": exc.detail}
        start = time.perf_counter()
        times = _time_passes(problem, _rotating(problem, lambda case: problem.timed(config, case), passes))
        if problem.device.type == "cuda":
            torch.cuda.synchronize(problem.device)
        seconds["timing"] = time.perf_counter() - start
        return {"status": "ok", "checks": checks, "seconds": seconds, **times}
    if kind == "inductor":
        compiled = torch.compile(problem.eager)
        calls = _rotating(problem, lambda case: problem.peer_passes(compiled, case), passes)
        start = time.perf_counter()
        for name in passes:  # Dynamo, AOTAutograd and Inductor compile here, at each pass's first call
            calls[name][0]()
        if problem.device.type == "cuda":
            torch.cuda.synchronize(problem.device)
        compiled_at = time.perf_counter()
        times = _time_passes(problem, calls)
        seconds = {"smoke": compiled_at - start, "timing": time.perf_counter() - compiled_at}
        return {"status": "ok", "seconds": seconds, **times}
    if kind == "in_context":
        return _in_context(problem, request[1], passes)
    if kind == "bandwidth":
        flops = getattr(problem, "flops", None)  # patterns holding matmuls: their floor is compute, too
        return {"status": "ok", "copy_gbps": copy_gbps(problem.device),
                "matmul_tflops": matmul_tflops(problem.device) if flops else None}
    raise ValueError(f"unknown worker request {kind!r}")


def _load(pattern: str, flags: dict, dtype: str, shape: list[int], device: str, max_rows: int | None,
          passes: list[str]) -> tuple[Any, list[str]]:
    """The problem a worker holds, and the passes it times."""
    from autokernel.lowering import families

    problem = families()[pattern].problem(flags, dtype, shape, device)
    problem.max_rows = max_rows
    return problem, passes


def serve(conn_in, conn_out, **args: Any) -> None:
    """Child-process main loop: requests arrive on ``conn_in``, answers leave on ``conn_out``. The first
    problem comes with the process's arguments; ``("problem", args)`` swaps in another (the tuner reuses
    one process for many requests: its start, torch's import and the CUDA context cost seconds each time)."""
    device = torch.device(args["device"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device ("cuda": the default)
    problem, passes = _load(**args)
    conn_out.send({"status": "ready"})
    while True:
        request = conn_in.recv()
        if request[0] == "stop":
            return
        try:
            if request[0] == "problem":
                # Dynamo's compiles of the last problem's functions go (the next problem of the same family
                # compiles the same code objects, whose cache would fill up with guards), and so do its tensors.
                problem = None
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                problem, passes = _load(**request[1])
                reply = {"status": "ready"}
            else:
                reply = handle(problem, request, passes)
        except Exception as exc:
            reply = {"status": "error", "detail": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=8)}
        if device.type == "cuda":
            torch.cuda.synchronize()
        conn_out.send(reply)


if __name__ == "__main__":  # python -m ... FD_IN FD_OUT ARGS_JSON, started by the tuner (child.spawn)
    run_child(serve)
