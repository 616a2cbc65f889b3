"""The offline search: for one wanted (pattern, variant, shape), check and time the playbook's
candidates in a child process, race the best against Inductor, and write the cache entry.

The loop is edit -> check -> benchmark -> keep or revert, over the family's kernel space in phases
(forward knobs, then backward knobs with the forward's winner; a forward-only request, from inference,
has the forward phase alone and is raced on the forward alone). A phase stops on the budget, on a
plateau (no candidate 1% better for a while), or within 3% of the floor. Candidates and Inductor are timed
on the GPU clock (CUDA-graph replay; the worker falls back to host time where capture fails). Every candidate is
written to ``results.tsv`` in the run's folder under the cache's ``runs/``, with ``progress.png`` (best
time over candidates, Inductor's and the floor) when matplotlib is installed.

The run starts from what earlier runs learned on this GPU (:mod:`autokernel.playbook.notes`): the
nearest tuned shape's winner (a cache entry or a note) goes first, and candidates that failed their
checks on this shape before are skipped (``retry_failed`` runs them). When the shape's run ends, its
winner and its failed candidates are appended to the notes. A killed run is resumed by the next one.

Under the Triton interpreter (CPU) timings mean nothing: there a few candidates run on tiny shapes,
the best correct one is kept without the race against Inductor, and the entry says so.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from autokernel import __version__
from autokernel.cache import KernelCache, row_bucket
from autokernel.cache.fingerprint import interpreter_enabled
from autokernel.cache.store import PASSES, WRITE_ERRORS, CacheWriteError, describe_write_error
from autokernel.playbook.child import spawn
from autokernel.playbook.notes import (
    NOTES_VERSION,
    REASON_CHARS,
    NotesStore,
    candidate_id,
    shape_distance,
    shown_config,
)
from autokernel.playbook.notes import brief as notes_brief
from autokernel.playbook.precompile import Precompiler, compilers

logger = logging.getLogger("autokernel")

PLATEAU = 8  # candidates without a 1% gain before a phase ends
NEAR_FLOOR = 1.03  # a phase ends once its best is within 3% of the floor
INTERPRETER_ROWS = 64  # rows used under the interpreter, whatever the wanted shape
INTERPRETER_CANDIDATES = 3
LOOKAHEAD = 8  # configs offered to the precompiler at each step (it takes what its compilers have room for)
# A training request's forward phase ends (once it has a passing candidate) after this share of the budget: the
# backward phase decides the training entry, and a forward phase that ran to the end of the budget left the
# Llama step's linear + cross-entropy with its default chunk for training (28.5 ms; 21.5 once tuned). The share is
# of what the budget has left when the candidates start: the worker's start and Inductor's baseline come first (with
# the in-context race after the candidates, 25 s of a 44 s RMSNorm 8192x4096 run on the H100), and counted from the
# run's start they ate most of the forward phase's share.
FWD_BUDGET_SHARE = 0.4
# --strategy both: the search's share of the budget; the agent gets the rest (a search that used it all left the
# agent nothing: its phase starts only while the budget lasts).
SEARCH_BUDGET_SHARE_WITH_AGENT = 0.5
# A problem that trades time for memory (``race_slack``, linear + cross-entropy's: the bar is 1.05x
# Inductor's time within 1.4 GiB) is served up to that much slower than Inductor only where, in context, its peak
# memory is at most this share of Inductor's; every other problem must be faster.
MEMORY_SHARE = 0.5


def race_slack(problem: Any) -> float:
    """How much slower than Inductor ``problem``'s kernel may be and still be served (its ``race_slack``; 0 for a
    problem that does not trade time for memory): the tuner's race and ``ak-cache verify``'s re-race read it."""
    return float(getattr(problem, "race_slack", 0.0))


@dataclass
class TuneRequest:
    pattern: str
    flags: dict[str, Any]
    dtype: str
    shape: list[int]
    # Inference: only the forward pass is searched, timed and raced; the entry serves the forward pass only
    # (a training compile still misses it and records a training request).
    forward_only: bool = False

    @classmethod
    def from_wanted(cls, record: dict[str, Any]) -> TuneRequest:
        """The request for a wanted-table record: forward-only when no sighting of the miss needed a backward."""
        return cls(record["pattern"], record["flags"], record["dtype"], record["shape"],
                   forward_only=not record.get("train", True))

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes this request tunes, as the worker and the cache entry name them."""
        return ("fwd",) if self.forward_only else PASSES

    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.flags.items())
        shape = "x".join(map(str, self.shape))
        return " ".join(p for p in (self.pattern, shape, self.dtype, "fwd-only" * self.forward_only, flags) if p)

    def identity(self) -> tuple[str, str, str, int, int]:
        """What one cache entry serves: pattern, variant flags, dtype, hidden size and row bucket. Requests
        with equal identities are one tuning problem, whatever their exact row counts."""
        return (self.pattern, json.dumps(self.flags, sort_keys=True), self.dtype, self.shape[-1],
                row_bucket(math.prod(self.shape[:-1])))


@dataclass
class TuneResult:
    request: TuneRequest
    status: str  # "written", "inductor wins", "no correct candidate", "error"
    # The passes the written entry serves with our kernel: "written" may mean the forward only, the training
    # pass having lost its race (alone or in context) to Inductor.
    served: tuple[str, ...] = ()
    best: dict[str, Any] | None = None
    times: dict[str, float | None] = field(default_factory=dict)
    candidates: int = 0
    seconds: float = 0.0
    run_dir: str = ""
    detail: str = ""
    retryable: bool = False  # an error of the worker process or its device, not of the request: worth another try


class WorkerFailure(Exception):
    pass


class WorkerHang(WorkerFailure):
    """The worker did not answer within the timeout (and was killed)."""


class WorkerStartFailure(WorkerFailure):
    """The worker died or hung before it was ready: no candidate is to blame, the process or its device is."""


class Worker:
    """A child process holding one problem at a time; restarted after a crash or a hang."""

    def __init__(self, request: TuneRequest, device: torch.device, max_rows: int | None, timeout_s: float,
                 precompile: int = 0):
        self.device = device
        self.args = self._args(request, max_rows)
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.to_child: Connection | None = None
        self.from_child: Connection | None = None
        self.stale = False  # the running child holds another problem than ``args``
        # ``precompile`` compiler processes build the next candidates' kernels ahead of the loop (CUDA only).
        self.precompiler = Precompiler(self.args, precompile) if precompile and device.type == "cuda" else None

    def _args(self, request: TuneRequest, max_rows: int | None) -> dict[str, Any]:
        return {"pattern": request.pattern, "flags": request.flags, "dtype": request.dtype,
                "shape": list(request.shape), "device": str(self.device), "max_rows": max_rows,
                "passes": list(request.passes)}

    def retarget(self, request: TuneRequest, max_rows: int | None) -> None:
        """Hold ``request``'s problem from the next call on, in the same child process when it runs (no new
        process: its start costs seconds, a ranking or a model's tune makes one per request)."""
        args = self._args(request, max_rows)
        if args != self.args:
            self.args = args
            self.stale = self.proc is not None
            if self.precompiler is not None:
                self.precompiler.retarget(args)

    def ahead(self, configs: list[dict[str, Any]]) -> None:
        """The configs the loop runs next, for the precompiler (if any) to compile meanwhile."""
        if self.precompiler is not None:
            self.precompiler.ahead(configs)

    def precompiled(self, config: dict[str, Any]) -> str:
        """Whether the precompiler compiled ``config`` before it ran: done, failed, pending, or ''."""
        return (self.precompiler.state(config) or "") if self.precompiler is not None else ""

    def start(self) -> None:
        self.proc, self.to_child, self.from_child = spawn("autokernel.playbook.worker", self.args)
        try:
            reply = self._receive(max(self.timeout_s, 300.0))
        except WorkerFailure as exc:
            raise WorkerStartFailure(f"worker did not start: {exc}") from None
        if reply.get("status") != "ready":
            self.kill()
            raise WorkerStartFailure(f"worker did not start: {reply}")

    def _receive(self, timeout: float) -> dict[str, Any]:
        if not self.from_child.poll(timeout):
            self.kill()
            raise WorkerHang(f"no answer within {timeout:.0f} s (hang?)")
        try:
            return self.from_child.recv()
        except (EOFError, OSError):
            code = self.proc.wait(10) if self.proc else None
            self.kill()
            raise WorkerFailure(f"worker died (exit code {code})") from None

    def call(self, *request: Any) -> dict[str, Any]:
        if self.proc is None:
            self.start()
        elif self.stale:
            self.stale = False
            what = f"worker could not load {self.args['pattern']} {self.args['shape']}"
            try:
                reply = self._send(("problem", self.args))
            except WorkerFailure as exc:
                raise WorkerStartFailure(f"{what}: {exc}") from None
            if reply.get("status") != "ready":
                self.kill()
                raise WorkerStartFailure(f"{what}: {reply.get('detail', reply)}")
        return self._send(request)

    def _send(self, request: tuple) -> dict[str, Any]:
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
        self.stale = False

    def stop(self) -> None:
        if self.precompiler is not None:
            self.precompiler.stop()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.to_child.send(("stop",))
                self.proc.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class _Log:
    """A run's results.tsv. A full disk must not end the run: the first failed write is logged, the file
    keeps what was written before it, and the run goes on without the log.

    Columns, those of older logs first in their old order (readers by position keep working): ``n`` (the
    candidate's number in this run), ``phase``, ``status`` (ok, failed, crashed, error, skipped), ``fwd_ms``,
    ``train_ms``, ``speedup_vs_inductor`` and ``pct_of_floor`` (of ``ms``), ``seconds``, ``config``,
    ``detail`` (what went wrong); then ``time``, ``shape``, ``strategy`` (where the candidate came from:
    search, warm start, resume, agent), ``candidate`` (its id, as in the notes), ``check_failed`` (the check
    stage, or crash, hang, error), ``ms`` (the phase's time: forward for ``fwd``, forward + backward
    otherwise) and ``notes`` (what the tuner made of it); then where a passing candidate's ``seconds`` went in
    the worker: ``smoke_s`` (its first run, which compiles its kernels), ``checks_s`` (the other check stages)
    and ``timing_s``; then ``precompiled``: whether the precompiler had compiled its kernels when it ran
    (done, pending, failed; empty without one). Resume reads ``phase``, ``status``, ``config``, ``fwd_ms`` and
    ``train_ms``."""

    FIELDS = ["n", "phase", "status", "fwd_ms", "train_ms", "speedup_vs_inductor", "pct_of_floor", "seconds",
              "config", "detail", "time", "shape", "strategy", "candidate", "check_failed", "ms", "notes",
              "smoke_s", "checks_s", "timing_s", "precompiled"]

    def __init__(self, path: Path, shape: str):
        self.path = path
        self.shape = shape
        self.rows: list[dict[str, Any]] = []  # every row, also once the file cannot be written (for the plot)
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
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "shape": self.shape,
                  **{k: ("" if v is None else v) for k, v in values.items()}}
        self.rows.append(record)
        if self.file is None:
            return
        try:
            self.writer.writerow(record)
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
         agent_model: str | None = None, max_turns: int = 20, agent_price: tuple[float, float] | None = None,
         retry_failed: bool = False,
         baseline: tuple[dict[str, float | None], dict[str, float | None]] | None = None,
         worker: Worker | None = None, precompile: int | None = None) -> TuneResult:
    """Tune one request; write its cache entry (or an "Inductor wins" entry); return what happened.

    ``strategy``: "search" (the playbook's kernel space), "agent" (an LLM writes kernels; needs
    ANTHROPIC_API_KEY), or "both" (search first, then the agent tries to beat it); ``agent_price``: USD per
    million (input, output) tokens for the agent's cost in the log, where the built-in table does not know the
    model or its prices changed. ``retry_failed``: run
    the candidates that the notes say failed on this shape before, instead of skipping them. ``baseline``:
    the floor and Inductor's times already measured on this GPU for this request (``measure_baseline``),
    not measured again. ``worker``: a :class:`Worker` on ``device`` to reuse (it is retargeted to this
    request and left running, for the caller to stop); without one, the run starts its own, with ``precompile``
    compiler processes (:mod:`autokernel.playbook.precompile`; None: :func:`compilers`' default)."""
    from autokernel.lowering import families

    t0 = time.time()
    family = families().get(request.pattern)
    if family is None:
        return TuneResult(request, "error", detail=f"unknown pattern {request.pattern!r}")
    flags = _ReadFlags(request.flags)
    try:
        problem = family.problem(flags, request.dtype, request.shape, device)
    except ValueError as exc:
        return TuneResult(request, "error", detail=str(exc))
    if unknown := sorted(set(flags) - flags.read):  # a typo would otherwise tune the default variant
        return TuneResult(request, "error", detail=f"{request.pattern} has no flag {', '.join(unknown)} (it reads "
                                                   f"{', '.join(sorted(flags.read)) or 'none'})")
    interpret = device.type == "cpu" and interpreter_enabled()
    max_rows = INTERPRETER_ROWS if interpret else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    variant = hashlib.sha256(json.dumps(request.flags, sort_keys=True).encode()).hexdigest()[:8]
    shape = "x".join(map(str, request.shape))
    # A forward-only run is resumed only by another forward-only run of the shape.
    slug = f"{request.pattern}-{shape}-{request.dtype}-{variant}" + ("-fwd" if request.forward_only else "")
    interrupted = _interrupted_run(cache.runs_dir, slug)
    run_dir = cache.runs_dir / f"{stamp}-{slug}"
    log = _Log(run_dir / "results.tsv", shape)
    completed = False
    result = TuneResult(request, "no correct candidate", run_dir=str(run_dir))
    own_worker = worker is None
    if worker is None:
        worker = Worker(request, device, max_rows, timeout_s, compilers(precompile))
    else:
        worker.retarget(request, max_rows)
    say = progress or (lambda _msg: None)
    notes = NotesStore(cache.notes_path)
    bucket = row_bucket(problem.rows)
    learned = _Learned()
    floor: dict[str, float | None] = {k: None for k in problem.bytes_moved()}
    peer: dict[str, float | None] = {"fwd_ms": None, "train_ms": None}
    phases = ("fwd",) if request.forward_only else ("fwd", "bwd")
    try:
        records = notes.records()
        known_failed = {} if retry_failed else notes.failures(problem.key, problem.hidden, bucket, records)
        candidates: list[tuple[str, dict[str, Any], str]] = []  # (phase, config, where it came from)
        if strategy in ("search", "both"):
            candidates = _default_first([(phase, config, "search") for phase, config in problem.candidates()
                                         if phase in phases], problem.default_candidate())
        if interpret:  # the first forward candidate, then the last phase's first few
            candidates = candidates[:1] + [c for c in candidates[1:] if c[0] == phases[-1]][:INTERPRETER_CANDIDATES - 1]
        warm = _nearest_tuned(cache, problem, notes.winners(problem.key, problem.hidden, bucket, records))
        warm_note = ""
        if warm is not None and candidates:
            # Warm start: the nearest tuned shape's winner goes first in both phases, so a good baseline
            # sets the plateau's bar from the first candidate. A winner of another width is a guess here
            # (warps and blocks follow the width: a 2048-wide backward's launch took 2.5 ms at 8192 wide, 8x
            # the default's): this shape's default goes before it, so a short budget still has a sane bar.
            label, warm_config, warm_hidden = warm
            warm_note = f"warm start from {label}"
            say(warm_note)
            firsts = [(warm_config, "warm start")]
            if warm_hidden != problem.hidden:
                firsts.insert(0, (problem.default_candidate(), "search"))
            candidates = [(phase, config, origin) for phase in phases for config, origin in firsts] + candidates
        skip: set[str] = set()
        front_count = 0
        if interrupted is not None and candidates:
            # Resume: what the killed run checked is not run again, except each phase's best so far,
            # which is re-measured first (its times are this run's baseline).
            old_dir, old_rows = interrupted
            skip = {r["config"] for r in old_rows if r.get("phase") in ("fwd", "bwd")}
            learned.adopt(old_rows)
            front = []
            for phase, metric in (("fwd", "fwd_ms"), ("bwd", "train_ms"))[:len(phases)]:
                ok = [r for r in old_rows if r.get("phase") == phase and r.get("status") == "ok" and r.get(metric)]
                if ok:
                    front.append((phase, json.loads(min(ok, key=lambda r: float(r[metric]))["config"]), "resume"))
            log.row(strategy="resume", phase="resume", status="resumed",
                    detail=f"from {old_dir.name}: {len(skip)} candidates already checked there")
            say(f"resuming {old_dir.name}")
            candidates = front + candidates
            front_count = len(front)
        stale = {"fwd": 0, "bwd": 0, "agent": 0}
        # The first candidates compile in the precompiler while the worker starts and Inductor's baseline runs
        # (a backward with the default's forward knobs, as the loop runs it while no forward has passed).
        worker.ahead(_upcoming(candidates, stale, problem.default_candidate()))
        if baseline is not None and not interpret:
            floor, peer = baseline
            log.row(strategy="inductor", n=0, phase="peer", status="inductor ok (measured before this run)",
                    fwd_ms=_fmt(peer["fwd_ms"]), train_ms=_fmt(peer["train_ms"]), detail="")
        elif not interpret:
            say("racing Inductor")
            split: dict[str, float] = {}
            floor, peer, detail = measure_baseline(worker, problem, seconds=split)
            log.row(strategy="inductor", n=0, phase="peer", status="inductor " + ("ok" if not detail else "error"),
                    fwd_ms=_fmt(peer["fwd_ms"]), train_ms=_fmt(peer["train_ms"]), detail=detail,
                    **{f"{part}_s": f"{sec:.2f}" for part, sec in split.items()})
        best: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}
        counter = {"n": 0}
        tried: set[tuple[str, str]] = set()  # (phase, candidate id) run in this run

        def evaluate(phase: str, config: dict[str, Any], origin: str) -> dict[str, Any]:
            """Check and time one candidate in the worker (unless it failed on this shape before); log it;
            keep it if it is the phase's best."""
            metric, passname = ("fwd_ms", "fwd") if phase == "fwd" else ("train_ms", "train")
            cid = candidate_id(config)
            shown = json.dumps(shown_config(config), sort_keys=True)
            known = known_failed.get(cid)
            if known is not None:
                log.row(strategy=origin, candidate=cid, phase=phase, status="skipped", check_failed=known.get("check"),
                        config=shown, detail=str(known.get("reason", ""))[:500],
                        notes=f"failed on this shape in run {known['run']}; not run again (--retry-failed runs it)")
                tried.add((phase, cid))
                say(f"{phase} candidate {cid} skipped: failed here before")
                return {"status": "skipped", "stage": known.get("check"),
                        "detail": f"this candidate failed on this shape in an earlier run and is not run again: "
                                  f"{known.get('check')}: {known.get('reason', '')}"}
            counter["n"] += 1
            tried.add((phase, cid))
            t1 = time.time()
            precompiled = worker.precompiled(config)
            check = ""
            try:
                reply = worker.call("candidate", config)
            except WorkerStartFailure:
                raise  # not this candidate's failure: the shape ends, and ak-tune may try it on another device
            except WorkerFailure as exc:
                reply = {"status": "crashed", "detail": str(exc)}
                check = "hang" if isinstance(exc, WorkerHang) else "crash"
            ms = reply.get(metric)
            if reply["status"] == "ok":
                stale[phase] = 0 if phase not in best or ms < best[phase][0] * 0.99 else stale[phase] + 1
                if phase not in best or ms < best[phase][0]:
                    best[phase] = (ms, config, reply)
                learned.passed.add(cid)
            detail = reply.get("detail", "") if reply["status"] != "ok" else ""
            if reply["status"] == "failed":
                check = reply["stage"]
                detail = f"{check}: {detail}"
            elif reply["status"] == "error":
                check = "error"
            if check:
                learned.failed.append({"candidate": cid, "phase": phase, "config": shown_config(config),
                                       "status": reply["status"], "check": check, "reason": detail[:REASON_CHARS]})
            peer_ms = peer.get(metric)
            host_clock = ("host clock: CUDA-graph capture failed"
                          if reply.get("clock") == "host" and not interpret else "")
            log.row(strategy=origin, n=counter["n"], candidate=cid, phase=phase, status=reply["status"],
                    check_failed=check, ms=_fmt(ms), fwd_ms=_fmt(reply.get("fwd_ms")),
                    train_ms=_fmt(reply.get("train_ms")),
                    speedup_vs_inductor=_fmt(peer_ms / ms) if (peer_ms and ms) else "",
                    pct_of_floor=f"{100 * floor[passname] / ms:.1f}" if (floor[passname] and ms) else "",
                    seconds=f"{time.time() - t1:.1f}", config=shown, detail=detail[:500],
                    **{f"{part}_s": f"{sec:.2f}" for part, sec in reply.get("seconds", {}).items()},
                    precompiled=precompiled,
                    notes="; ".join(filter(None, [warm_note if origin == "warm start" else "", host_clock])))
            best_ms = best.get(phase, (None,))[0]
            say(f"candidate {counter['n']} {phase} {reply['status']}"
                + (f", best {phase} {best_ms:.4f} ms" if best_ms is not None else ""))
            return reply

        loop_t0 = time.time()
        search_budget_s = budget_s * (SEARCH_BUDGET_SHARE_WITH_AGENT if strategy == "both" else 1.0)
        loop_budget_s = max(search_budget_s - (loop_t0 - t0), 0.0)
        fwd_winner: dict[str, Any] | None = None
        late: set[str] = set()  # phases given a candidate after the budget ran out
        for index, (phase, config, origin) in enumerate(candidates):
            passname = "fwd" if phase == "fwd" else "train"
            # Past the budget, each phase still gets one candidate if it has no passing one yet, so a shape
            # once started writes a checked, raced kernel (a run whose ranking used the budget wrote nothing).
            overtime = time.time() - t0 > search_budget_s
            if overtime:
                if all(p in best or p in late for p in phases):
                    say("budget spent")
                    break
                if phase in best or phase in late:
                    continue
            if stale[phase] >= PLATEAU:
                continue
            if _forward_share_spent(phase, phases, time.time() - loop_t0, loop_budget_s, phase in best):
                continue
            if phase in best and floor[passname] and best[phase][0] <= floor[passname] * NEAR_FLOOR:
                continue
            if phase == "bwd":
                if fwd_winner is None:
                    fwd_winner = best["fwd"][1] if "fwd" in best else problem.default_candidate()
                config = _with_forward_knobs(config, fwd_winner)
            if index >= front_count and json.dumps(config, sort_keys=True) in skip:
                continue
            if (phase, candidate_id(config)) in tried:
                continue  # e.g. the warm start's config is also in the search space
            if overtime:
                late.add(phase)
            worker.ahead(_upcoming(candidates[index + 1:], stale, fwd_winner or config))
            evaluate(phase, config, origin)
        if strategy in ("agent", "both") and request.forward_only:
            # The agent's task and its ranking are forward + backward; a forward-only request keeps the search's.
            log.row(n="", phase="agent", status="skipped", detail="forward-only request: the agent tunes training")
        elif strategy in ("agent", "both") and time.time() - t0 < budget_s:
            _agent_phase(problem, best, peer, floor, evaluate, agent_model, max_turns, t0 + budget_s, say, log,
                         notes_brief(notes, problem.key, problem.hidden, bucket) | {"gpu": cache.fingerprint},
                         agent_price)
        # The final kernel: the fastest forward+backward among the backward and agent phases' winners (for a
        # forward-only request, the forward phase's winner).
        trained = [best[p] for p in ("bwd", "agent") if p in best]
        final = min(trained, key=lambda b: b[2]["train_ms"]) if trained else best.get("fwd")
        result.candidates = counter["n"]
        if final is None:
            result.detail = "every candidate failed its checks (see results.tsv)" + _failure_summary(learned.failed)
            completed = True
            return result
        _ms, config, reply = final
        times = {"fwd_ms": reply["fwd_ms"], "train_ms": reply.get("train_ms"),
                 "inductor_fwd_ms": peer["fwd_ms"], "inductor_train_ms": peer["train_ms"],
                 "floor_fwd_ms": floor["fwd"], "floor_train_ms": floor["train"]}
        learned.winner = _winner_note(config, times)
        # A pass not tuned is Inductor's here; the backend treats it as a miss (tuned_passes), not a loss.
        slack = race_slack(problem)  # its memory is weighed in context, below
        if interpret:
            winner = {p: ("autokernel" if p in request.passes else "inductor") for p in PASSES}
        else:
            winner = {p: ("autokernel" if p in request.passes and (peer[f"{p}_ms"] is None
                                                                   or times[f"{p}_ms"] < peer[f"{p}_ms"] * (1 + slack))
                          else "inductor") for p in PASSES}
        entry = {
            "version": 1, "pattern": request.pattern, "pattern_key": problem.key,
            "hidden": problem.hidden, "row_bucket": bucket,
            "shape": list(request.shape), "flags": problem.flags, "dtype": request.dtype,
            "kernel": _kernel_record(request.pattern, config),
            "winner": winner, "times": times, "raced": not interpret,
            "producer": {"strategy": "agent" if "source" in config else "search", "autokernel": __version__,
                         "torch": torch.__version__,
                         "run": str(run_dir)},
            "checks": reply["checks"], "created": time.time(),
        }
        if request.forward_only:
            entry["passes"] = list(request.passes)
        if not interpret and "autokernel" in winner.values():
            _race_in_context(worker, entry, log, say, request.passes, slack)
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
        result.served = tuple(p for p in PASSES if winner[p] == "autokernel")
        result.status = "written" if result.served else "inductor wins"
        completed = True
        return result
    except WorkerFailure as exc:
        result.status, result.detail, result.retryable = "error", str(exc), True
        return result
    except WRITE_ERRORS as exc:  # the cache (or the disk under it) failed: this shape is lost, not the run
        result.status, result.detail = "error", f"cache {cache.path}: {describe_write_error(exc)}"
        return result
    except BaseException:
        # Interrupted (Ctrl-C) or a bug: no notes, the next run resumes from this run's results.tsv.
        learned.aborted = True
        raise
    finally:
        if own_worker:
            worker.stop()
        log.close()
        if log.failure:
            result.detail = "; ".join(filter(None, [result.detail, f"results.tsv incomplete: {log.failure}"]))
        if not learned.aborted and (learned.winner is not None or learned.failed):
            notes.append(learned.record(request, problem, run_dir.name, result.status, strategy, not interpret))
        plot_progress(run_dir / "progress.png", log.rows, f"{problem.describe()} ({strategy})", peer, floor)
        if completed:
            try:
                (run_dir / "done").write_text(result.status + "\n")
            except OSError as exc:  # costs only the marker: a rerun of this shape resumes, not skips
                logger.warning("ak-tune: could not mark %s done: %s", run_dir, describe_write_error(exc))
        result.seconds = time.time() - t0
        logger.info("ak-tune %s: %s in %.1f s (%s)", request.label(), result.status, result.seconds, run_dir)


def _stays_ours(ctx: dict[str, Any], p: str, slack: float) -> bool:
    """Whether pass ``p`` stays ours after the in-context race ``ctx``: faster than Inductor, or, within a time
    ``slack`` (a problem that trades time for memory), at most :data:`MEMORY_SHARE` of Inductor's peak memory."""
    ours, theirs = ctx.get(f"{p}_ms"), ctx.get(f"inductor_{p}_ms")
    if ours is None or theirs is None:
        return ours is not None
    if ours < theirs:
        return True
    our_peak, their_peak = ctx.get(f"{p}_peak_mib"), ctx.get(f"inductor_{p}_peak_mib")
    return (ours <= theirs * (1 + slack) and our_peak is not None and their_peak is not None
            and our_peak <= their_peak * MEMORY_SHARE)


def _race_in_context(worker: Worker, entry: dict[str, Any], log: _Log, say: Callable[[str], None],
                     passes: tuple[str, ...] = PASSES, slack: float = 0.0) -> None:
    """The kernels won alone; a pass stays ours only if it also wins served through torch.compile against
    Inductor's compile of the same function, both timed the same way in the worker (a pattern kernel that
    wins alone and loses in context is a loss), or, for a problem with a time ``slack``, stays within it at
    a fraction of Inductor's peak memory (:func:`_stays_ours`). Updates ``entry``'s winner and records the times
    and peaks."""
    say("racing Inductor in context")
    try:
        ctx = worker.call("in_context", entry)
    except WorkerFailure as exc:
        ctx = {"status": "crashed", "detail": str(exc)}
    before = dict(entry["winner"])
    if ctx["status"] != "ok":
        # Not a loss of our kernel's but a failure of the race (e.g. the compiled pattern not hitting the entry):
        # Inductor keeps the pattern, and this says why where the closing table only says "inductor wins".
        logger.warning("ak-tune: %s H=%s: the in-context race failed (%s): %s; Inductor keeps it",
                       entry["pattern_key"], entry["hidden"], ctx["status"], ctx.get("detail", "")[:300])
    for p in passes:
        for impl in ("", "inductor_"):
            entry["times"][f"in_context_{impl}{p}_ms"] = ctx.get(f"{impl}{p}_ms")
            entry["times"][f"in_context_{impl}{p}_peak_mib"] = ctx.get(f"{impl}{p}_peak_mib")
        if before[p] == "autokernel" and not _stays_ours(ctx, p, slack):
            entry["winner"][p] = "inductor"
    entry["times"]["in_context_clock"] = ctx.get("clock")
    changed = f"winner {before} -> {entry['winner']}" if entry["winner"] != before else ""
    inductor_text = ", ".join(f"Inductor {p} {ctx[f'inductor_{p}_ms']:.4f} ms" for p in passes
                              if ctx.get(f"inductor_{p}_ms") is not None)
    peaks = ", ".join(f"{p} peak {ctx[f'{p}_peak_mib']:.0f} MiB (Inductor {ctx[f'inductor_{p}_peak_mib']:.0f})"
                      for p in passes if ctx.get(f"{p}_peak_mib") is not None
                      and ctx.get(f"inductor_{p}_peak_mib") is not None)
    log.row(strategy="inductor", n="", phase="in context", status=ctx["status"], fwd_ms=_fmt(ctx.get("fwd_ms")),
            train_ms=_fmt(ctx.get("train_ms")),
            detail="; ".join(filter(None, [ctx.get("detail", ""), f"{ctx.get('clock')} clock" if inductor_text else "",
                                            inductor_text, peaks, changed]))[:500])


def _with_forward_knobs(config: dict[str, Any], fwd_config: dict[str, Any]) -> dict[str, Any]:
    """A backward candidate run with ``fwd_config``'s forward knobs (the ``fwd_`` keys)."""
    return {**config, **{k: v for k, v in fwd_config.items() if k.startswith("fwd_")}}


def _upcoming(candidates: list[tuple[str, dict[str, Any], str]], stale: dict[str, int],
              fwd_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configs the loop will likely run next (as far as known now; a wrong guess costs a compile on a spare
    core): the next ``LOOKAHEAD`` of ``candidates`` in phases not yet ended on a plateau, a backward candidate
    with ``fwd_config``'s forward knobs (the forward winner's, or the current candidate's)."""
    out = []
    for phase, config, _origin in candidates:
        if len(out) == LOOKAHEAD:
            break
        if stale[phase] >= PLATEAU:
            continue
        if phase == "bwd":
            config = _with_forward_knobs(config, fwd_config)
        out.append(config)
    return out


def _default_first(candidates: list[tuple[str, dict[str, Any], str]],
                   default: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """``candidates`` (grouped by phase) with the family's default configuration first in each phase. A short
    budget runs one candidate a phase (the worker's start and Inductor's baseline take most of it), and the
    spaces enumerate knobs from the smallest: an RMSNorm 8192x4096 backward with 2 warps a program, the first of
    its phase, took 1.18 ms on the H100 against the default's ~0.13 (benchmarks/NOTES.md, session 11)."""
    out: list[tuple[str, dict[str, Any], str]] = []
    for phase in dict.fromkeys(c[0] for c in candidates):
        group = [c for c in candidates if c[0] == phase]
        rest = [c for c in group if c[1] != default]
        out += [(phase, default, "search"), *rest]
    return out


def _forward_share_spent(phase: str, phases: tuple[str, ...], elapsed_s: float, budget_s: float,
                         has_passing: bool) -> bool:
    """Whether a forward candidate is skipped because the forward phase of a training request has used its share
    (:data:`FWD_BUDGET_SHARE`) of ``budget_s`` (the budget left when the candidates started; ``elapsed_s`` is counted
    from then) and already has a passing candidate."""
    return phase == "fwd" and "bwd" in phases and has_passing and elapsed_s > FWD_BUDGET_SHARE * budget_s


@dataclass
class _Learned:
    """What one run learned, for the notes: its winner, the candidates that failed and those that passed."""

    winner: dict[str, Any] | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    passed: set[str] = field(default_factory=set)
    aborted: bool = False  # the run ended by an exception: nothing to note

    def adopt(self, rows: list[dict[str, str]]) -> None:
        """Take over what a killed run (its results.tsv rows, old format or new) had learned."""
        for r in rows:
            if r.get("phase") not in ("fwd", "bwd", "agent") or not r.get("config"):
                continue
            try:
                config = json.loads(r["config"])
            except ValueError:
                continue
            cid = candidate_id(config)
            if r.get("status") == "ok":
                self.passed.add(cid)
            elif r.get("status") in ("failed", "crashed", "error"):
                check = r.get("check_failed") or {
                    "failed": r.get("detail", "").split(":")[0], "error": "error",
                    "crashed": "hang" if "no answer within" in r.get("detail", "") else "crash"}[r["status"]]
                self.failed.append({"candidate": cid, "phase": r["phase"], "config": config, "status": r["status"],
                                    "check": check, "reason": r.get("detail", "")[:REASON_CHARS]})

    def record(self, request: TuneRequest, problem: Any, run: str, status: str, strategy: str,
               raced: bool) -> dict[str, Any]:
        return {"v": NOTES_VERSION, "time": time.time(), "run": run, "pattern": request.pattern,
                "pattern_key": problem.key, "flags": problem.flags, "dtype": request.dtype,
                "shape": list(request.shape), "hidden": problem.hidden, "row_bucket": row_bucket(problem.rows),
                "status": status, "strategy": strategy, "raced": raced, "autokernel": __version__,
                "winner": self.winner, "failed": self.failed, "passed": sorted(self.passed)}


def _winner_note(candidate: dict[str, Any], times: dict[str, float | None]) -> dict[str, Any]:
    """The notes' view of a run's winner: its config and times, against Inductor and the floor, per pass."""
    def ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
        return round(scale * num / den, 3) if num and den else None

    return {"candidate": candidate_id(candidate), "kind": "source" if "source" in candidate else "family",
            "config": shown_config(candidate), "fwd_ms": times["fwd_ms"], "train_ms": times["train_ms"],
            "vs_inductor": {p: ratio(times[f"inductor_{p}_ms"], times[f"{p}_ms"]) for p in ("fwd", "train")},
            "pct_floor": {p: ratio(times[f"floor_{p}_ms"], times[f"{p}_ms"], 100.0) for p in ("fwd", "train")}}


def plot_progress(path: Path, rows: list[dict[str, Any]], title: str, peer: dict[str, float | None],
                  floor: dict[str, float | None]) -> bool:
    """Draw ``progress.png``: per pass, each candidate's time and the best so far over the run's candidates,
    with Inductor's time and the DRAM floor as lines. Only when matplotlib is installed (not a dependency of
    autokernel: ``pip install 'autokernel[bench]'``); a figure that cannot be drawn costs a warning."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.debug("ak-tune: matplotlib is not installed; no %s", path)
        return False
    measured = [r for r in rows if r.get("status") == "ok" and r.get("n")]
    if not measured:
        return False
    panels = [(passname, metric, label) for passname, metric, label in (("fwd", "fwd_ms", "forward"),
                                                                      ("train", "train_ms", "forward + backward"))
              if any(r.get(metric) for r in measured)]  # a forward-only run has no forward + backward times
    try:
        fig = Figure(figsize=(5 * len(panels), 4))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (passname, metric, label) in zip(axes, panels, strict=True):
            timed = [r for r in measured if r.get(metric)]
            xs = [int(r["n"]) for r in timed]
            ys = [float(r[metric]) for r in timed]
            ax.scatter(xs, ys, s=12, color="0.6", label="candidate")
            ax.step(xs, [min(ys[:i + 1]) for i in range(len(ys))], where="post", color="C0", label="best so far")
            if peer.get(metric):
                ax.axhline(peer[metric], color="C3", linestyle="--", label=f"Inductor {peer[metric]:.4f} ms")
            if floor.get(passname):
                ax.axhline(floor[passname], color="C2", linestyle=":", label=f"DRAM floor {floor[passname]:.4f} ms")
            ax.set_title(label)
            ax.set_xlabel("candidate")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("ms")
            ax.legend(fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return True
    except Exception as exc:  # a picture must never cost the run
        logger.warning("ak-tune: could not draw %s: %s: %s", path, type(exc).__name__, exc)
        return False


def _failure_summary(failed: list[dict[str, Any]]) -> str:
    """Where a run's candidates failed, for the one line a user sees: the count at each check and the first
    reason (one cause behind every failure, an out-of-memory say, shows there without opening results.tsv)."""
    if not failed:
        return ""
    counts = collections.Counter(f["check"] for f in failed)
    where = ", ".join(f"{check} {n}" for check, n in counts.most_common())
    return f": {where}; the first: {failed[0]['reason'][:300]}"


def measure_baseline(worker: Worker, problem: Any, rates: dict[str, float | None] | None = None,
                     seconds: dict[str, float] | None = None
                     ) -> tuple[dict[str, float | None], dict[str, float | None], str]:
    """The floor of each pass and Inductor's times, in ms, on the worker's device; the third item says what went
    wrong with Inductor's run, or is ''. The floor is the DRAM floor (bytes over the measured copy bandwidth),
    or for a pattern holding matmuls (``problem.flops()``) the larger of that and its FLOPs over the measured
    bf16 matmul rate. ``rates``: the worker's ``bandwidth`` answer, already measured on this device.
    ``seconds``, when given, receives the worker's wall time for Inductor: ``"smoke"`` (each pass's first run,
    where Dynamo, AOTAutograd and Inductor compile) and ``"timing"``."""
    if rates is None:
        rates = worker.call("bandwidth")
    bw, tflops = rates.get("copy_gbps"), rates.get("matmul_tflops")
    floor = {k: (v / (bw * 1e9) * 1e3 if bw else None) for k, v in problem.bytes_moved().items()}
    if tflops and hasattr(problem, "flops"):
        floor = {k: max(v or 0.0, problem.flops()[k] / (tflops * 1e12) * 1e3) for k, v in floor.items()}
    reply = worker.call("inductor")
    if seconds is not None:
        seconds.update(reply.get("seconds", {}))
    if reply["status"] != "ok":
        return floor, {"fwd_ms": None, "train_ms": None}, reply.get("detail", reply["status"])
    return floor, {"fwd_ms": reply["fwd_ms"], "train_ms": reply.get("train_ms")}, ""  # train: None if forward-only


class _ReadFlags(dict):
    """A request's flags, remembering which keys the problem looked up: a family reads every flag it has when
    it builds its problem, so a key it never read is no flag of the pattern."""

    def __init__(self, flags: dict[str, Any]):
        super().__init__(flags)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _interrupted_run(runs_dir: Path, slug: str) -> tuple[Path, list[dict[str, str]]] | None:
    """The latest run of this request that did not finish (killed), with its results so far."""
    runs = sorted(runs_dir.glob(f"*-{slug}")) if runs_dir.is_dir() else []
    if not runs or (runs[-1] / "done").exists() or not (runs[-1] / "results.tsv").exists():
        return None
    with open(runs[-1] / "results.tsv", newline="") as f:
        return runs[-1], list(csv.DictReader(f, delimiter="\t"))


def _nearest_tuned(cache: KernelCache, problem: Any,
                   noted: Iterable[dict[str, Any]] = ()) -> tuple[str, dict[str, Any], int] | None:
    """(where from, config, hidden size) of the closest tuned shape of the same variant (hidden size first, then
    rows), if any: among the cache's entries and the notes' winners (``noted``, as :meth:`NotesStore.winners`
    gives them). The same shape counts too: a retune starts from what the last one found, and re-measures it.
    Source kernels are left out (a config of the built-in family is what the search varies)."""
    from autokernel.cache.store import entry_problem

    here = (problem.hidden, row_bucket(problem.rows))
    found = []  # (distance, order, label, config); entries before notes at equal distance
    for key, entry in cache.entries():
        if entry_problem(entry) or entry["pattern_key"] != problem.key or entry["kernel"]["kind"] != "family":
            continue
        found.append((shape_distance(entry["hidden"], entry["row_bucket"], *here), 0, key,
                      dict(entry["kernel"]["config"]), entry["hidden"]))
    for record in noted:
        if record["pattern_key"] == problem.key and record["winner"].get("kind", "family") == "family":
            found.append((shape_distance(record["hidden"], record["row_bucket"], *here), 1,
                          f"notes: run {record.get('run', '?')}", dict(record["winner"]["config"]), record["hidden"]))
    if not found:
        return None
    _distance, _order, label, config, hidden = min(found, key=lambda f: f[:2])
    return label, config, hidden


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


def _agent_phase(problem, best, peer, floor, evaluate, model, max_turns, deadline, say, log, noted,
                 price=None) -> None:
    """Let the agent try to beat the best so far; an unavailable agent is logged, never fatal. Its task
    (``read_task``) is the problem's brief, the playbook for the problem and ``noted``: what the notes say
    about this pattern key on this GPU."""
    from autokernel.playbook.agent import DEFAULT_MODEL, AgentUnavailable, run_agent
    from autokernel.playbook.rules import playbook_for

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
        reply = evaluate("agent", candidate, "agent")
        return {k: v for k, v in reply.items() if k != "traceback"}

    say("agent")
    try:
        brief = {**problem.agent_brief(), "playbook": playbook_for(problem), "notes_on_this_gpu": noted}
        model = model or DEFAULT_MODEL
        run = run_agent(brief, current_best, submit, model=model, max_turns=max_turns, deadline=deadline, say=say,
                        price=price)
        log.row(n="", phase="agent", status=f"done ({run.stop})",
                detail=f"{run.turns} turns, {run.submissions} submissions, {run.usage(model, price)}")
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
