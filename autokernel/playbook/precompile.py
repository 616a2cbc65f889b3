"""Compiling the search's next candidates while the worker checks and times the current one.

A candidate's first run in the worker is mostly Triton compiling its kernels, one compile per
specialization (the target shape, each sweep shape, the non-contiguous case, ...): about half of the
search loop's time on an H100 host (``smoke_s`` in results.tsv). The compiles depend on nothing the loop
learns, so they can run ahead, on the host's other cores: each compiler process holds the problem on
*meta* tensors and runs every case the checks and the timing will run, with each Triton launch turned
into a compile without a launch (``JITFunction.run(..., warmup=True)``). Nothing runs on the GPU, so the
worker's timing is undisturbed; the kernels land in Triton's on-disk cache, where the worker's own
compile finds them and loads the binary instead of compiling.

Precompiling only saves time: a compiler that fails or dies costs nothing but its work (the worker
compiles for itself, and reports the candidate's errors as it always did). CUDA only: under the
interpreter nothing is compiled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch

from autokernel.playbook.checks import check_cases
from autokernel.playbook.child import run_child, spawn
from autokernel.playbook.notes import candidate_id

logger = logging.getLogger("autokernel")

IN_FLIGHT = 2  # candidates queued at one compiler: enough to keep it busy, few enough to follow the loop


def compilers(requested: int | None = None) -> int:
    """Compiler processes for one GPU: ``requested``, or by default a quarter of the host's cores, at most 4 (a
    candidate compiles in ~0.5 s of one core; the loop takes one every ~0.6 s), at least 1."""
    if requested is not None:
        return requested
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class Precompiler:
    """Compiler processes for one worker's problem. :meth:`ahead` queues the configs the loop will run next;
    :meth:`state` says whether a config's compile finished ("done"), failed ("failed") or is still queued or
    running ("pending"), or was never queued (None)."""

    def __init__(self, args: dict[str, Any], processes: int):
        self.args = args
        self.processes = processes
        self.children: list[tuple[subprocess.Popen, Connection, Connection]] = []
        self.in_flight: list[list[str]] = []  # per child: the candidate ids sent and not yet answered, in order
        self.dead: set[int] = set()  # children that died or could not be reached: never sent work again
        self.states: dict[str, str] = {}

    def _start(self) -> None:
        for _ in range(self.processes):
            try:
                self.children.append(spawn("autokernel.playbook.precompile", self.args))
            except OSError as exc:
                logger.debug("precompiler: could not start a compiler: %s", exc)
            else:
                self.in_flight.append([])

    def retarget(self, args: dict[str, Any]) -> None:
        """Compile for another problem from now on (what was queued for the old one is still compiled)."""
        if args == self.args:
            return
        self.args = args
        self.states.clear()
        # The old problem's queued compiles are still answered, first: their answers must not mark a config of
        # the same id queued for the new problem.
        self.in_flight = [[""] * len(queued) for queued in self.in_flight]
        for i in range(len(self.children)):
            self._send(i, ("problem", args))

    def _send(self, i: int, request: tuple) -> bool:
        if i in self.dead:
            return False
        try:
            self.children[i][1].send(request)
        except OSError:
            self.dead.add(i)
            return False
        return True

    def _drain(self) -> None:
        """Read every answer that has arrived; mark a compiler that died (its queued ids stay pending)."""
        for i, (proc, _to_child, from_child) in enumerate(self.children):
            try:
                while i not in self.dead and self.in_flight[i] and from_child.poll(0):
                    reply = from_child.recv()
                    cid = self.in_flight[i].pop(0)
                    if cid in self.states:
                        self.states[cid] = "done" if reply.get("status") == "ok" else "failed"
                    if reply.get("status") != "ok":
                        logger.debug("precompiler: candidate %s: %s", cid, reply.get("detail"))
            except (EOFError, OSError):
                logger.debug("precompiler: compiler %d died (exit code %s)", i, proc.poll())
                self.dead.add(i)

    def ahead(self, configs: list[dict[str, Any]]) -> None:
        """Queue ``configs`` (in the loop's order) at the least busy compilers, as far as they have room;
        a config queued before is not queued again. Agent-written source is not precompiled."""
        if not self.children:
            self._start()
        self._drain()
        for config in configs:
            cid = candidate_id(config)
            if "source" in config or cid in self.states:
                continue
            idle = [i for i in range(len(self.children)) if i not in self.dead and len(self.in_flight[i]) < IN_FLIGHT]
            if not idle:
                return
            i = min(idle, key=lambda j: len(self.in_flight[j]))
            if self._send(i, ("compile", config)):
                self.in_flight[i].append(cid)
                self.states[cid] = "pending"

    def state(self, config: dict[str, Any]) -> str | None:
        self._drain()
        return self.states.get(candidate_id(config))

    def stop(self) -> None:
        for i in range(len(self.children)):  # all told first: a busy one's wait does not delay the others' exit
            self._send(i, ("stop",))
        for proc, to_child, from_child in self.children:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # mid-compile: its work is no longer wanted
                proc.kill()
                proc.wait(10)
            to_child.close()
            from_child.close()
        self.children, self.in_flight, self.dead = [], [], set()


# ---- the compiler process ------------------------------------------------------------------------------

def _compile_without_launching() -> None:
    """Every Triton launch in this process from now on compiles the kernel (into the on-disk cache) and
    returns without running it."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        # Loading the binary builds its launcher (a C stub per signature, cached on disk beside the kernels)
        # and checks its shared memory against the GPU's: what the worker's first launch would do next.
        init = getattr(kernel, "_init_handles", None)
        if init is not None:
            init()
        return kernel

    JITFunction.run = compile_only


@contextlib.contextmanager
def meta_random() -> Iterator[None]:
    """Inside, ``torch.randn`` gives meta tensors and ``torch.randint`` zeros (on the CPU: labels and positions,
    small, that the cases may index or combine with host tensors) of the asked size and dtype. The families draw
    their cases on the CPU (a seeded CPU generator) and then move them to the problem's device: on meta only sizes,
    dtypes and strides matter, and drawing the data took seconds per problem (38 s for cross-entropy 8192x128256 on
    a 2-core host) before a compiler's first compile."""
    randn, randint = torch.randn, torch.randint

    def meta_randn(*size, generator=None, **kwargs):
        return torch.empty(*size, **{**kwargs, "device": "meta"})

    def meta_randint(*args, generator=None, **kwargs):  # randint(high, size) or randint(low, high, size)
        size = args[-1] if args else kwargs["size"]
        return torch.zeros(size, dtype=kwargs.get("dtype") or torch.int64, device=kwargs.get("device"))

    torch.randn, torch.randint = meta_randn, meta_randint
    try:
        yield
    finally:
        torch.randn, torch.randint = randn, randint


def _load(pattern: str, flags: dict, dtype: str, shape: list[int], device: str, max_rows: int | None,
          passes: list[str]) -> tuple[Any, Any]:
    """The problem on meta tensors, and its check cases (drawn with :func:`meta_random`, or the slow exact way
    for a family whose case building cannot take meta data)."""
    from autokernel.lowering import families

    def load() -> tuple[Any, Any]:
        problem = families()[pattern].problem(flags, dtype, shape, "meta")
        problem.max_rows = max_rows
        return problem, check_cases(problem, max_rows)

    try:
        with meta_random():
            return load()
    except Exception as exc:  # e.g. meta data mixed with a CPU tensor, or a value read on the host
        logger.debug("precompiler: %s cases on meta data failed (%s); drawing them on the CPU", pattern, exc)
        return load()


def compile_candidate(problem: Any, cases: Any, config: dict[str, Any]) -> None:
    """Run ``config`` on every case the checks run, and each timed pass once on the target case (on meta
    tensors under :func:`_compile_without_launching`, this compiles every kernel the worker will launch)."""
    for case in cases.all():
        problem.run(config, case)
    for call in problem.timed(config, cases.target).values():
        call()


def serve(conn_in: Connection, conn_out: Connection, **args: Any) -> None:
    """Compiler main loop: ``("compile", config)`` is answered with ``{"status": "ok", "seconds": s}`` or an
    error; ``("problem", args)`` swaps the problem and is not answered; ``("stop",)`` ends it."""
    device = torch.device(args["device"])
    if device.type == "cuda" and device.index is not None:
        # The kernels are compiled for the current device's architecture, and the meta device's persistent
        # grids are sized by its SM count (``launch.sm_count``).
        torch.cuda.set_device(device)
    _compile_without_launching()
    problem = cases = None
    while True:
        try:
            request = conn_in.recv()
        except EOFError:  # the tuner is gone (killed): nothing left to compile for
            return
        kind = request[0]
        if kind == "stop":
            return
        if kind == "problem":
            args, problem = request[1], None
            continue
        start = time.perf_counter()
        try:
            if problem is None:
                problem, cases = _load(**args)
            compile_candidate(problem, cases, request[1])
            reply = {"status": "ok", "seconds": time.perf_counter() - start}
        except Exception as exc:
            reply = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
        conn_out.send(reply)


if __name__ == "__main__":  # python -m ... FD_IN FD_OUT ARGS_JSON, started by the tuner (child.spawn)
    run_child(serve)
