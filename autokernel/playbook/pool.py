"""Spreading ``ak-tune``'s work: over hosts (:class:`Shard`, ``--shard K/N``) and over this host's GPUs
(:func:`tune_all`, ``--gpus``).

Hosts share nothing while they tune: each takes the requests its shard owns, tunes them into its own
cache, and the caches are merged afterwards (``ak-cache export`` / ``import``). A request's owner is
picked from a SHA-256 of its identity (:meth:`TuneRequest.identity`), never from its place in the
wanted table nor Python's ``hash`` (salted per process), so hosts agree on it without talking, and a
request every host sees is tuned by exactly one of them even where their tables differ otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.cache import KernelCache
from autokernel.playbook.precompile import compilers
from autokernel.playbook.tuner import TuneRequest, TuneResult, Worker, tune

logger = logging.getLogger("autokernel")

ATTEMPTS = 2  # a job whose worker failed (or whose tune raised) runs once more, maybe on another device


@dataclass(frozen=True)
class Shard:
    """Share ``number`` (counted from 1) of ``count`` hosts' shares."""

    number: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 1 <= K <= N; ValueError (its message meant for the user) otherwise."""
        number, _slash, count = text.partition("/")
        try:
            shard = cls(int(number), int(count))
        except ValueError:
            raise ValueError(f"--shard looks like K/N (share K of N, counted from 1), got {text!r}") from None
        if shard.count < 1 or not 1 <= shard.number <= shard.count:
            raise ValueError(f"--shard K/N needs 1 <= K <= N (shares count from 1: 1/2 and 2/2), got {text!r}")
        return shard

    def owns(self, request: TuneRequest) -> bool:
        digest = hashlib.sha256(json.dumps(request.identity()).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.number - 1

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


@dataclass
class Job:
    """One request in :func:`tune_all`'s queue."""

    request: TuneRequest
    wanted_key: str | None = None  # its record in the wanted table, dropped once it is tuned
    baseline: tuple[dict[str, float | None], dict[str, float | None]] | None = None  # for tune(): not re-measured
    attempts: int = 0
    weight: float | None = None  # what tuning it could save (ms, Amdahl); None: unknown


def budget_share(job: Job, queued: Sequence[Job], left: float, devices: int) -> float:
    """Seconds of ``left`` for ``job``, taken before the ``queued`` jobs: in proportion to its weight when every
    one of them has a weight and they sum above zero, else an equal share. A job that could save nothing while
    others could gets no share (it is still started, and ``tune`` then runs one candidate). Time a job does not
    use (it stopped at its floor or on a plateau) goes to the jobs after it."""
    weights = [j.weight for j in (job, *queued)]
    if all(w is not None for w in weights):
        total = sum(max(w, 0.0) for w in weights)
        if total > 0:
            return left * devices * max(job.weight, 0.0) / total
    return left * devices / len(weights)


def tune_all(jobs: list[Job], cache: KernelCache, devices: list[torch.device], deadline: float, timeout_s: float,
             progress: Callable[[str, str], None] = lambda _prefix, _message: None, out: Callable[[str], None] = print,
             **tune_kwargs: Any) -> list[TuneResult]:
    """Tune ``jobs`` on ``devices`` at once: one thread per device takes the next job from one queue, in
    order, until the queue is empty; a job taken after ``deadline`` (a ``time.time()``) is left in the
    wanted table. Each job gets its share of the time left (:func:`budget_share`: by the time it could save,
    where the jobs say). A tuned job's wanted record is dropped.

    A job whose worker process failed outside a candidate (it did not start, or died timing Inductor), or
    whose ``tune`` raised, goes back to the end of the queue, where any device may take it, and counts as
    an error after ``ATTEMPTS`` tries: no thread dies with its queue, and no job runs twice once it
    finished. ``progress(prefix, message)`` hears each job's steps; ``out`` gets one line per problem."""
    queue = deque(enumerate(jobs))
    lock = threading.Lock()
    results: list[TuneResult] = []

    def serve(device: torch.device) -> None:
        local = KernelCache(cache.root, fingerprint_=cache.fingerprint)  # one database connection per thread
        worker: Worker | None = None  # one child process per device for all its jobs, made by the first
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    index, job = queue.popleft()
                    left = deadline - time.time()
                    share = budget_share(job, [j for _, j in queue], left, len(devices))
                if left <= 0:
                    with lock:
                        out(f"budget spent: {job.request.label()} left in the wanted table")
                    continue
                prefix = f"{index + 1}/{len(jobs)} {job.request.label()}"
                if len(devices) > 1:
                    prefix += f" on {device}"
                job.attempts += 1
                if worker is None:
                    worker = Worker(job.request, device, None, timeout_s, compilers(tune_kwargs.get("precompile")))
                result = _attempt(job, local, device, min(share, left), timeout_s,
                                  lambda msg, prefix=prefix: progress(prefix, msg), dict(tune_kwargs, worker=worker))
                with lock:
                    if result.retryable and job.attempts < ATTEMPTS:
                        out(f"{job.request.label()}: {result.detail}; queued again")
                        queue.append((index, job))
                        continue
                    results.append(result)
                    if job.wanted_key is not None and result.status in ("written", "inductor wins"):
                        local.remove_wanted(job.wanted_key)
                    if result.detail:
                        out(f"{job.request.label()}: {result.status}: {result.detail}")
        finally:
            if worker is not None:
                worker.stop()
            local.close()

    threads = [threading.Thread(target=serve, args=(device,), name=f"ak-tune {device}") for device in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _attempt(job: Job, cache: KernelCache, device: torch.device, budget_s: float, timeout_s: float,
             say: Callable[[str], None], tune_kwargs: dict[str, Any]) -> TuneResult:
    """One ``tune`` of ``job``; an exception out of it (a bug, or a device that failed in this process)
    becomes an error result worth another attempt, so it costs this job, not the thread's queue."""
    try:
        return tune(job.request, cache, device, budget_s=budget_s, timeout_s=timeout_s, progress=say,
                    baseline=job.baseline, **tune_kwargs)
    except Exception as exc:
        logger.exception("ak-tune %s on %s raised", job.request.label(), device)
        return TuneResult(job.request, "error", detail=f"ak-tune raised {type(exc).__name__}: {exc}",
                          retryable=True)
