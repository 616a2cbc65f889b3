"""The offline search: for one wanted (pattern, variant, shape), check and time the playbook's
candidates in a child process, race the best against Inductor, and write the cache entry.

The loop is edit -> check -> benchmark -> keep or revert, over the family's kernel space in phases
(forward knobs, then backward knobs with the forward's winner). A phase stops on the budget, on a
plateau (no candidate 1% better for a while), or within 3% of the DRAM floor. Every candidate is
written to ``results.tsv`` under the cache's ``runs/`` folder.

Under the Triton interpreter (CPU) timings mean nothing: there a few candidates run on tiny shapes,
the best correct one is kept without the race against Inductor, and the entry says so.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from autokernel import __version__
from autokernel.cache import KernelCache, row_bucket
from autokernel.cache.fingerprint import interpreter_enabled
from autokernel.cache.store import WRITE_ERRORS, CacheWriteError, describe_write_error

logger = logging.getLogger("autokernel")

PLATEAU = 8  # candidates without a 1% gain before a phase ends
NEAR_FLOOR = 1.03  # a phase ends once its best is within 3% of the floor
INTERPRETER_ROWS = 64  # rows used under the interpreter, whatever the wanted shape
INTERPRETER_CANDIDATES = 3


@dataclass
class TuneRequest:
    pattern: str
    flags: dict[str, Any]
    dtype: str
    shape: list[int]

    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.flags.items())
        return " ".join(p for p in (self.pattern, "x".join(map(str, self.shape)), self.dtype, flags) if p)


@dataclass
class TuneResult:
    request: TuneRequest
    status: str  # "written", "inductor wins", "no correct candidate", "error"
    best: dict[str, Any] | None = None
    times: dict[str, float | None] = field(default_factory=dict)
    candidates: int = 0
    seconds: float = 0.0
    run_dir: str = ""
    detail: str = ""


class WorkerFailure(Exception):
    pass


class Worker:
    """A child process holding one problem; restarted after a crash or a hang."""

    def __init__(self, request: TuneRequest, device: torch.device, max_rows: int | None, timeout_s: float):
        self.args = {"pattern": request.pattern, "flags": request.flags, "dtype": request.dtype,
                     "shape": list(request.shape), "device": str(device), "max_rows": max_rows}
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.to_child: Connection | None = None
        self.from_child: Connection | None = None

    def start(self) -> None:
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autokernel.playbook.worker", str(child_in), str(child_out),
             json.dumps(self.args)],
            pass_fds=(child_in, child_out), stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.to_child = Connection(parent_out, readable=False)
        self.from_child = Connection(parent_in, writable=False)
        reply = self._receive(max(self.timeout_s, 300.0))
        if reply.get("status") != "ready":
            raise WorkerFailure(f"worker did not start: {reply}")

    def _receive(self, timeout: float) -> dict[str, Any]:
        if not self.from_child.poll(timeout):
            self.kill()
            raise WorkerFailure(f"no answer within {timeout:.0f} s (hang?)")
        try:
            return self.from_child.recv()
        except (EOFError, OSError):
            code = self.proc.wait(10) if self.proc else None
            self.kill()
            raise WorkerFailure(f"worker died (exit code {code})") from None

    def call(self, *request: Any) -> dict[str, Any]:
        if self.proc is None:
            self.start()
        try:
            self.to_child.send(request)
        except (BrokenPipeError, OSError):
            self.kill()
            raise WorkerFailure("worker pipe closed") from None
        return self._receive(self.timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for conn in (self.to_child, self.from_child):
            if conn is not None:
                conn.close()
        self.proc = self.to_child = self.from_child = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.to_child.send(("stop",))
                self.proc.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class _Log:
    """A run's results.tsv. A full disk must not end the run: the first failed write is logged, the file
    keeps what was written before it, and the run goes on without the log."""

    FIELDS = ["n", "phase", "status", "fwd_ms", "train_ms", "speedup_vs_inductor", "pct_of_floor", "seconds",
              "config", "detail"]

    def __init__(self, path: Path):
        self.path = path
        self.file = None
        self.failure = ""  # what went wrong writing it, or ''
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
            self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS, delimiter="\t")
            self.writer.writeheader()
            self.file.flush()
        except OSError as exc:
            self._failed(exc)

    def row(self, **values: Any) -> None:
        if self.file is None:
            return
        try:
            self.writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
            self.file.flush()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.failure = f"could not write {self.path}: {describe_write_error(exc)}"
        logger.warning("ak-tune: %s; the run goes on without its log", self.failure)
        self.close()

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError as exc:  # the last buffered row did not fit; the file is closed all the same
                if not self.failure:
                    self.failure = f"could not write {self.path}: {describe_write_error(exc)}"
                    logger.warning("ak-tune: %s", self.failure)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


STRATEGIES = ("search", "agent", "both")


def tune(request: TuneRequest, cache: KernelCache, device: torch.device, budget_s: float,
         timeout_s: float = 180.0, progress: Callable[[str], None] | None = None, strategy: str = "search",
         agent_model: str | None = None, max_turns: int = 20,
         baseline: tuple[dict[str, float | None], dict[str, float | None]] | None = None) -> TuneResult:
    """Tune one request; write its cache entry (or an "Inductor wins" entry); return what happened.

    ``strategy``: "search" (the playbook's kernel space), "agent" (an LLM writes kernels; needs
    ANTHROPIC_API_KEY), or "both" (search first, then the agent tries to beat it). ``baseline``: the floor
    and Inductor's times already measured on this GPU for this request (``measure_baseline``), not measured
    again."""
    from autokernel.lowering import families

    t0 = time.time()
    family = families().get(request.pattern)
    if family is None:
        return TuneResult(request, "error", detail=f"unknown pattern {request.pattern!r}")
    try:
        problem = family.problem(request.flags, request.dtype, request.shape, device)
    except ValueError as exc:
        return TuneResult(request, "error", detail=str(exc))
    interpret = device.type == "cpu" and interpreter_enabled()
    max_rows = INTERPRETER_ROWS if interpret else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    variant = hashlib.sha256(json.dumps(request.flags, sort_keys=True).encode()).hexdigest()[:8]
    slug = f"{request.pattern}-{'x'.join(map(str, request.shape))}-{request.dtype}-{variant}"
    interrupted = _interrupted_run(cache.runs_dir, slug)
    run_dir = cache.runs_dir / f"{stamp}-{slug}"
    log = _Log(run_dir / "results.tsv")
    completed = False
    result = TuneResult(request, "no correct candidate", run_dir=str(run_dir))
    worker = Worker(request, device, max_rows, timeout_s)
    say = progress or (lambda _msg: None)
    try:
        floor = {k: None for k in problem.bytes_moved()}
        peer = {"fwd_ms": None, "train_ms": None}
        if baseline is not None and not interpret:
            floor, peer = baseline
            log.row(n=0, phase="peer", status="inductor ok (measured before this run)",
                    fwd_ms=_fmt(peer["fwd_ms"]), train_ms=_fmt(peer["train_ms"]), detail="")
        elif not interpret:
            say("racing Inductor")
            floor, peer, detail = measure_baseline(worker, problem)
            log.row(n=0, phase="peer", status="inductor " + ("ok" if not detail else "error"),
                    fwd_ms=_fmt(peer["fwd_ms"]), train_ms=_fmt(peer["train_ms"]), detail=detail)
        candidates = problem.candidates() if strategy in ("search", "both") else []
        if interpret:
            candidates = candidates[:1] + [c for c in candidates if c[0] == "bwd"][:INTERPRETER_CANDIDATES - 1]
        warm = _nearest_tuned(cache, problem)
        if warm is not None and candidates:
            # Warm start: the nearest tuned shape's winner goes first in both phases, so a good baseline
            # sets the plateau's bar from the first candidate.
            say(f"warm start from {warm[0]}")
            candidates = [("fwd", warm[1]), ("bwd", warm[1])] + candidates
        skip: set[str] = set()
        if interrupted is not None and candidates:
            # Resume: what the killed run checked is not run again, except each phase's best so far,
            # which is re-measured first (its times are this run's baseline).
            old_dir, old_rows = interrupted
            skip = {r["config"] for r in old_rows if r.get("phase") in ("fwd", "bwd")}
            front = []
            for phase, metric in (("fwd", "fwd_ms"), ("bwd", "train_ms")):
                ok = [r for r in old_rows if r.get("phase") == phase and r.get("status") == "ok" and r.get(metric)]
                if ok:
                    front.append((phase, json.loads(min(ok, key=lambda r: float(r[metric]))["config"])))
            log.row(n="", phase="resume", status="resumed",
                    detail=f"from {old_dir.name}: {len(skip)} candidates already checked there")
            say(f"resuming {old_dir.name}")
            candidates = front + candidates
            front_count = len(front)
        else:
            front_count = 0
        best: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}
        stale = {"fwd": 0, "bwd": 0, "agent": 0}
        counter = {"n": 0}

        def evaluate(phase: str, config: dict[str, Any]) -> dict[str, Any]:
            """Check and time one candidate in the worker; log it; keep it if it is the phase's best."""
            metric, passname = ("fwd_ms", "fwd") if phase == "fwd" else ("train_ms", "train")
            counter["n"] += 1
            t1 = time.time()
            try:
                reply = worker.call("candidate", config)
            except WorkerFailure as exc:
                reply = {"status": "crashed", "detail": str(exc)}
            ms = reply.get(metric)
            if reply["status"] == "ok":
                stale[phase] = 0 if phase not in best or ms < best[phase][0] * 0.99 else stale[phase] + 1
                if phase not in best or ms < best[phase][0]:
                    best[phase] = (ms, config, reply)
            detail = reply.get("detail", "") if reply["status"] != "ok" else ""
            if reply["status"] == "failed":
                detail = f"{reply['stage']}: {detail}"
            peer_ms = peer.get(metric)
            shown = {k: v for k, v in config.items() if k != "source"}
            if "source" in config:
                shown["source_sha256"] = hashlib.sha256(config["source"].encode()).hexdigest()[:16]
            log.row(n=counter["n"], phase=phase, status=reply["status"], fwd_ms=_fmt(reply.get("fwd_ms")),
                    train_ms=_fmt(reply.get("train_ms")),
                    speedup_vs_inductor=_fmt(peer_ms / ms) if (peer_ms and ms) else "",
                    pct_of_floor=f"{100 * floor[passname] / ms:.1f}" if (floor[passname] and ms) else "",
                    seconds=f"{time.time() - t1:.1f}", config=json.dumps(shown, sort_keys=True), detail=detail[:500])
            best_ms = best.get(phase, (None,))[0]
            say(f"candidate {counter['n']} {phase} {reply['status']}"
                + (f", best {phase} {best_ms:.4f} ms" if best_ms is not None else ""))
            return reply

        fwd_winner: dict[str, Any] | None = None
        for index, (phase, config) in enumerate(candidates):
            passname = "fwd" if phase == "fwd" else "train"
            if time.time() - t0 > budget_s:
                say("budget spent")
                break
            if stale[phase] >= PLATEAU:
                continue
            if phase in best and floor[passname] and best[phase][0] <= floor[passname] * NEAR_FLOOR:
                continue
            if phase == "bwd":
                if fwd_winner is None:
                    fwd_winner = best["fwd"][1] if "fwd" in best else problem.default_candidate()
                config = {**config, **{k: v for k, v in fwd_winner.items() if k.startswith("fwd_")}}
            if index >= front_count and json.dumps(config, sort_keys=True) in skip:
                continue
            evaluate(phase, config)
        if strategy in ("agent", "both") and time.time() - t0 < budget_s:
            _agent_phase(problem, best, peer, floor, evaluate, agent_model, max_turns, t0 + budget_s, say, log)
        # The final kernel: the fastest forward+backward among the backward and agent phases' winners.
        trained = [best[p] for p in ("bwd", "agent") if p in best]
        final = min(trained, key=lambda b: b[2]["train_ms"]) if trained else best.get("fwd")
        result.candidates = counter["n"]
        if final is None:
            result.detail = "every candidate failed its checks (see results.tsv)"
            completed = True
            return result
        _ms, config, reply = final
        times = {"fwd_ms": reply["fwd_ms"], "train_ms": reply["train_ms"],
                 "inductor_fwd_ms": peer["fwd_ms"], "inductor_train_ms": peer["train_ms"],
                 "floor_fwd_ms": floor["fwd"], "floor_train_ms": floor["train"]}
        if interpret:
            winner = {"fwd": "autokernel", "train": "autokernel"}
        else:
            winner = {p: ("autokernel" if peer[f"{p}_ms"] is None or times[f"{p}_ms"] < peer[f"{p}_ms"]
                          else "inductor") for p in ("fwd", "train")}
        entry = {
            "version": 1, "pattern": request.pattern, "pattern_key": problem.key,
            "hidden": problem.hidden, "row_bucket": row_bucket(problem.rows),
            "shape": list(request.shape), "flags": problem.flags, "dtype": request.dtype,
            "kernel": _kernel_record(request.pattern, config),
            "winner": winner, "times": times, "raced": not interpret,
            "producer": {"strategy": "agent" if "source" in config else "search", "autokernel": __version__,
                         "torch": torch.__version__,
                         "run": str(run_dir)},
            "checks": reply["checks"], "created": time.time(),
        }
        if not interpret and "autokernel" in winner.values():
            _race_in_context(worker, entry, peer, log, say)
        result.best, result.times = config, times
        try:
            cache.put_entry(entry)
        except CacheWriteError as exc:
            # Not marked done: once there is room, the next ak-tune of this shape resumes from this run
            # (re-measuring only its best candidates) instead of starting over.
            result.status = "error"
            result.detail = (f"{exc}; nothing written for this shape"
                             + ("" if log.failure else f", its candidates are in {log.path}")
                             + "; rerun ak-tune once the cache can be written: it resumes from this run")
            return result
        result.status = "written" if "autokernel" in winner.values() else "inductor wins"
        completed = True
        return result
    except WorkerFailure as exc:
        result.status, result.detail = "error", str(exc)
        return result
    except WRITE_ERRORS as exc:  # the cache (or the disk under it) failed: this shape is lost, not the run
        result.status, result.detail = "error", f"cache {cache.path}: {describe_write_error(exc)}"
        return result
    finally:
        worker.stop()
        log.close()
        if log.failure:
            result.detail = "; ".join(filter(None, [result.detail, f"results.tsv incomplete: {log.failure}"]))
        if completed:
            try:
                (run_dir / "done").write_text(result.status + "\n")
            except OSError as exc:  # costs only the marker: a rerun of this shape resumes, not skips
                logger.warning("ak-tune: could not mark %s done: %s", run_dir, describe_write_error(exc))
        result.seconds = time.time() - t0
        logger.info("ak-tune %s: %s in %.1f s (%s)", request.label(), result.status, result.seconds, run_dir)


def _race_in_context(worker: Worker, entry: dict[str, Any], peer: dict[str, float | None], log: _Log,
                     say: Callable[[str], None]) -> None:
    """The kernel won alone; it wins only if it also wins served through torch.compile, timed as Inductor
    is (a pattern kernel that wins alone and loses in context is a loss). Updates ``entry``'s winner and
    records the in-context times in it."""
    say("racing Inductor in context")
    try:
        ctx = worker.call("in_context", entry)
    except WorkerFailure as exc:
        ctx = {"status": "crashed", "detail": str(exc)}
    before = dict(entry["winner"])
    for p in ("fwd", "train"):
        ms = ctx.get(f"{p}_ms")
        entry["times"][f"in_context_{p}_ms"] = ms
        if before[p] == "autokernel" and (ms is None or (peer[f"{p}_ms"] is not None and ms >= peer[f"{p}_ms"])):
            entry["winner"][p] = "inductor"
    changed = f"winner {before} -> {entry['winner']}" if entry["winner"] != before else ""
    log.row(n="", phase="in context", status=ctx["status"], fwd_ms=_fmt(ctx.get("fwd_ms")),
            train_ms=_fmt(ctx.get("train_ms")), detail="; ".join(filter(None, [ctx.get("detail", ""), changed]))[:500])


def measure_baseline(worker: Worker, problem: Any) -> tuple[dict[str, float | None], dict[str, float | None], str]:
    """The DRAM floor of each pass (from the measured copy bandwidth) and Inductor's times, in ms, on the
    worker's device; the third item says what went wrong with Inductor's run, or is ''."""
    bw = worker.call("bandwidth").get("copy_gbps")
    floor = {k: (v / (bw * 1e9) * 1e3 if bw else None) for k, v in problem.bytes_moved().items()}
    reply = worker.call("inductor")
    if reply["status"] != "ok":
        return floor, {"fwd_ms": None, "train_ms": None}, reply.get("detail", reply["status"])
    return floor, {"fwd_ms": reply["fwd_ms"], "train_ms": reply["train_ms"]}, ""


def _interrupted_run(runs_dir: Path, slug: str) -> tuple[Path, list[dict[str, str]]] | None:
    """The latest run of this request that did not finish (killed), with its results so far."""
    runs = sorted(runs_dir.glob(f"*-{slug}")) if runs_dir.is_dir() else []
    if not runs or (runs[-1] / "done").exists() or not (runs[-1] / "results.tsv").exists():
        return None
    with open(runs[-1] / "results.tsv", newline="") as f:
        return runs[-1], list(csv.DictReader(f, delimiter="\t"))


def _nearest_tuned(cache: KernelCache, problem: Any) -> tuple[str, dict[str, Any]] | None:
    """The config of the closest tuned shape of the same variant (hidden size first, then rows), if any."""
    import math

    from autokernel.cache.store import entry_problem

    best = None
    for key, entry in cache.entries():
        if entry_problem(entry) or entry["pattern_key"] != problem.key or entry["kernel"]["kind"] != "family":
            continue
        if entry["hidden"] == problem.hidden and entry["row_bucket"] == row_bucket(problem.rows):
            continue  # the same shape: being retuned
        distance = (abs(math.log2(entry["hidden"] / problem.hidden)),
                    abs(math.log2(entry["row_bucket"] / row_bucket(problem.rows))))
        if best is None or distance < best[0]:
            best = (distance, key, dict(entry["kernel"]["config"]))
    return (best[1], best[2]) if best else None


def entry_candidate(entry: dict[str, Any]) -> dict[str, Any]:
    """The candidate (config, plus source for a source kernel) a cache entry holds: ``_kernel_record``'s inverse."""
    candidate = dict(entry["kernel"].get("config") or {})
    if entry["kernel"]["kind"] == "source":
        candidate["source"] = entry["kernel"]["source"]
    return candidate


def verify_entry(entry: dict[str, Any], device: torch.device, max_rows: int = 64) -> None:
    """Run the five checks on a cache entry's kernel, in this process, on up to ``max_rows`` rows.

    Raises :class:`autokernel.playbook.checks.CheckFailed` (naming the stage) when it fails."""
    from autokernel.lowering import families
    from autokernel.playbook.checks import run_checks

    problem = families()[entry["pattern"]].problem(entry["flags"], entry["dtype"],
                                                   [min(entry["row_bucket"], max_rows), entry["hidden"]], device)
    with torch.enable_grad():
        run_checks(problem, entry_candidate(entry), max_rows=max_rows)


def _kernel_record(pattern: str, candidate: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in candidate.items() if k != "source"}
    if "source" in candidate:
        return {"kind": "source", "family": pattern, "source": candidate["source"], "config": config}
    return {"kind": "family", "family": pattern, "config": config}


def _agent_phase(problem, best, peer, floor, evaluate, model, max_turns, deadline, say, log) -> None:
    """Let the agent try to beat the best so far; an unavailable agent is logged, never fatal."""
    from autokernel.playbook.agent import DEFAULT_MODEL, AgentUnavailable, run_agent

    base = (best.get("bwd") or best.get("fwd") or (None, problem.default_candidate(), {}))[1]
    base = {k: v for k, v in base.items() if k != "source"}

    def current_best() -> dict[str, Any]:
        trained = [best[p] for p in ("bwd", "agent") if p in best]
        top = min(trained, key=lambda b: b[2]["train_ms"]) if trained else None
        return {"config": top[1] if top else base, "fwd_ms": top[2]["fwd_ms"] if top else None,
                "train_ms": top[2]["train_ms"] if top else None, "inductor": peer, "floor_ms": floor}

    def submit(tool_input: dict[str, Any]) -> dict[str, Any]:
        candidate = {**base, **(tool_input.get("config") or {})}
        if tool_input.get("source"):
            candidate["source"] = tool_input["source"]
        reply = evaluate("agent", candidate)
        return {k: v for k, v in reply.items() if k != "traceback"}

    say("agent")
    try:
        run = run_agent(problem.agent_brief(), current_best, submit, model=model or DEFAULT_MODEL,
                        max_turns=max_turns, deadline=deadline, say=say)
        log.row(n="", phase="agent", status=f"done ({run.stop})",
                detail=f"{run.turns} turns, {run.submissions} submissions, "
                       f"{run.input_tokens} input / {run.output_tokens} output tokens")
    except AgentUnavailable as exc:
        logger.warning("ak-tune: agent unavailable (%s); keeping the search's results", exc)
        log.row(n="", phase="agent", status="unavailable", detail=str(exc)[:500])


def set_interpreter_if_no_gpu() -> torch.device:
    """The device to tune for; without CUDA, the Triton interpreter on CPU (what the tests and demo use)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not interpreter_enabled():
        os.environ["TRITON_INTERPRET"] = "1"
        logger.info("no CUDA device: tuning for the Triton interpreter on CPU")
    return torch.device("cpu")
