"""What ``ak-tune`` learned on one GPU: the notes store.

One file per cache namespace (fingerprint), ``<cache root>/<fingerprint>/notes.jsonl``, one JSON object
per line and per tuned shape (a run), appended when the shape's run ends::

    {"v": 1, "time": 1764300000.0, "run": "20261128-101500-rms_norm-8x48-bf16-1a2b3c4d",
     "pattern": "rms_norm", "pattern_key": "...", "flags": {...}, "dtype": "bf16", "shape": [8, 48],
     "hidden": 48, "row_bucket": 8, "status": "written", "raced": false,
     "winner": {"candidate": "9f8e7d6c5b4a", "kind": "family", "config": {...}, "fwd_ms": 0.05,
                "train_ms": 0.18, "vs_inductor": {"fwd": 1.02, "train": 2.7}, "pct_floor": {"fwd": 94.0, ...}},
     "failed": [{"candidate": "0a1b2c3d4e5f", "phase": "agent", "config": {...}, "status": "failed",
                 "check": "shape sweep", "reason": "48x47 y: 12 of 2256 elements off ..."}],
     "passed": ["9f8e7d6c5b4a", ...], "autokernel": "0.1.0"}

``winner`` is null when no candidate passed its checks. A ``config`` is shown as ``results.tsv`` shows it:
a source kernel's text is replaced by ``source_sha256``, so a candidate is identified the same way in
both (:func:`candidate_id`). ``check`` is the correctness stage that failed, or ``crash`` (the worker
died), ``hang`` (no answer within ``--timeout``) or ``error`` (running it raised outside the checks).

The next ``ak-tune`` of the same pattern key warm-starts from the nearest winner and skips the
candidates that failed on the same shape (pattern key, hidden size, row bucket) under the same autokernel
version, except hangs and crashes (:data:`RETRIED_CHECKS`), and candidates that passed there later (``passed``:
the ids of this run's correct candidates); ``--retry-failed`` runs them all again.

Writers are several ``ak-tune`` processes (or ``--gpus`` threads) at once: a record is one ``write`` of
one line to a file opened for appending, under an exclusive ``flock`` where the platform has one, so
lines never interleave; a line left half-written by a full disk is closed off before the next record.
The store is best effort: a record that cannot be written, or a file that cannot be read or holds lines
that are not records, costs one warning per file and process; the tuning run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: appends are still single writes
    fcntl = None

logger = logging.getLogger("autokernel")

NOTES_VERSION = 1
REASON_CHARS = 300  # a failure's reason is cut to this many characters
# Failures a later run tries again: a hang depends on --timeout, and a dead worker may have been killed from
# outside (the machine, another process on the GPU); a failed check or a kernel that raises is the candidate's.
RETRIED_CHECKS = ("hang", "crash")

_warned: set[str] = set()  # notes files whose problems were logged already (one warning per file and process)
_warned_lock = threading.Lock()


def shown_config(candidate: dict[str, Any]) -> dict[str, Any]:
    """A candidate as logs and notes show it: a source kernel's text replaced by its hash."""
    shown = {k: v for k, v in candidate.items() if k != "source"}
    if "source" in candidate:
        shown["source_sha256"] = hashlib.sha256(candidate["source"].encode()).hexdigest()[:16]
    return shown


def candidate_id(candidate: dict[str, Any]) -> str:
    """A short stable name for a candidate (a config, or a config with source), the same in results.tsv
    and the notes; a shown config (with ``source_sha256``) has the same id as the candidate it shows."""
    shown = candidate if "source" not in candidate else shown_config(candidate)
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:12]


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a notes record this autokernel reads, or None."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    if record.get("v") != NOTES_VERSION:
        return f"version {record.get('v')!r} (this autokernel reads {NOTES_VERSION})"
    for key, typ in (("pattern", str), ("pattern_key", str), ("hidden", int), ("row_bucket", int),
                     ("failed", list), ("shape", list)):
        if not isinstance(record.get(key), typ):
            return f"field {key!r} missing or not a {typ.__name__}"
    if record["hidden"] < 1 or record["row_bucket"] < 1:
        return "a shape size below 1"
    winner = record.get("winner")
    if winner is not None and not (isinstance(winner, dict) and isinstance(winner.get("config"), dict)):
        return "winner without a config"
    if not all(isinstance(f, dict) and isinstance(f.get("candidate"), str) for f in record["failed"]):
        return "a failure without a candidate id"
    return None


class NotesStore:
    """The notes file of one cache namespace (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _warn_once(self, what: str, exc: BaseException | str) -> None:
        from autokernel.cache.store import describe_write_error

        with _warned_lock:
            if str(self.path) in _warned:
                return
            _warned.add(str(self.path))
        cause = describe_write_error(exc) if isinstance(exc, BaseException) else exc
        logger.warning("ak-tune: could not %s the notes %s: %s. Tuning goes on; further problems with this "
                       "file are not logged again.", what, self.path, cause)

    # ---- reading ----
    def records(self) -> list[dict[str, Any]]:
        """Every sound record, oldest first. A line that is not one is skipped (one warning); so is an
        unfinished last line, which a writer may be appending at this moment."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._warn_once("read", exc)
            return []
        lines = data.split(b"\n")
        if lines and lines[-1]:
            lines = lines[:-1]  # no newline yet: being written (or cut off; closed by the next append)
        out, bad = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                bad.append(f"line {number}: not JSON ({exc})")
                continue
            problem = record_problem(record)
            if problem:
                bad.append(f"line {number}: {problem}")
            else:
                out.append(record)
        if bad:
            self._warn_once("read every line of", f"{len(bad)} unreadable line(s) skipped, first {bad[0]}")
        return out

    def failures(self, pattern_key: str, hidden: int, bucket: int,
                 records: Iterable[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Candidate id -> its latest failure on this shape under this autokernel version (with the run it
        failed in), hangs and crashes left out. A candidate that passed on this shape after it failed is not a
        failure any more."""
        from autokernel import __version__

        out: dict[str, dict[str, Any]] = {}
        for record in self.records() if records is None else records:
            if (record["pattern_key"], record["hidden"], record["row_bucket"]) != (pattern_key, hidden, bucket):
                continue
            if record.get("autokernel", __version__) != __version__:
                continue  # another version's kernels (or checks) failed it
            for failure in record["failed"]:
                if failure.get("check") not in RETRIED_CHECKS:
                    out[failure["candidate"]] = {**failure, "run": record.get("run", "")}
            for passed in record.get("passed", []):
                out.pop(passed, None)
        return out

    def winners(self, pattern_key: str, hidden: int, bucket: int,
                records: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The records of this pattern key that have a winner, nearest shape first (hidden size, then rows,
        on a log scale), newest first among equals."""
        found = [r for r in (self.records() if records is None else records)
                 if r["pattern_key"] == pattern_key and r.get("winner")]
        found.reverse()  # newest first; sorted() keeps that order among equal distances
        return sorted(found, key=lambda r: shape_distance(r["hidden"], r["row_bucket"], hidden, bucket))

    # ---- writing ----
    def append(self, record: dict[str, Any]) -> bool:
        """Append one record; False (one warning per file and process) when it cannot be written."""
        problem = record_problem(record)
        if problem:
            raise ValueError(f"refusing to write a malformed notes record: {problem}")
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self._warn_once("write", exc)
            return False
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            # A line cut off by a full disk (or a killed writer) is closed, so that this record starts a line.
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND writes go to the end whatever the offset
                if os.read(fd, 1) != b"\n":
                    line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes")
            return True
        except OSError as exc:
            self._warn_once("write", exc)
            return False
        finally:
            os.close(fd)  # releases the lock


def shape_distance(hidden: int, bucket: int, to_hidden: int, to_bucket: int) -> tuple[float, float]:
    """How far a tuned shape is from another: hidden size first, then row bucket, as log2 ratios."""
    return (abs(math.log2(hidden / to_hidden)), abs(math.log2(bucket / to_bucket)))


def brief(store: NotesStore, pattern_key: str, hidden: int, bucket: int, limit: int = 10) -> dict[str, Any]:
    """What the agent reads about earlier runs of this pattern key on this GPU: the winners of the nearest
    shapes and the candidates that failed on this shape (with the check that failed)."""
    records = store.records()
    winners = [{"shape": r["shape"], "status": r.get("status", ""), **r["winner"]}
               for r in store.winners(pattern_key, hidden, bucket, records)[:limit]]
    failed = [{k: f.get(k) for k in ("candidate", "config", "check", "reason")}
              for f in store.failures(pattern_key, hidden, bucket, records).values()][-2 * limit:]
    return {"winners_nearest_first": winners, "failed_on_this_shape": failed}


def render(records: Iterable[dict[str, Any]]) -> str:
    """Records as text, one block per run: the shape, its winner and its failed candidates."""
    def times(winner: dict[str, Any]) -> str:
        vs, pct = winner.get("vs_inductor") or {}, winner.get("pct_floor") or {}
        out = []
        for p in ("fwd", "train"):
            ms = winner.get(f"{p}_ms")
            against = ", ".join(([f"{vs[p]:.2f}x Inductor"] if vs.get(p) else [])
                                + ([f"{pct[p]:.0f}% of floor"] if pct.get(p) else []))
            out.append(f"{p} {ms:.4f} ms" if isinstance(ms, (int, float)) else f"{p} -")
            out[-1] += f" ({against})" if against else ""
        return "  ".join(out)

    lines = []
    for r in records:
        flags = ",".join(f"{k}={v}" for k, v in (r.get("flags") or {}).items())
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["time"])) if isinstance(r.get("time"), float) else ""
        lines.append("  ".join(filter(None, [r["pattern"], "x".join(map(str, r["shape"])), r.get("dtype", ""), flags,
                                             when, r.get("strategy", ""), r.get("status", ""),
                                             "" if r.get("raced", True) else "(not raced)"])))
        if r.get("winner"):
            w = r["winner"]
            lines.append(f"  winner {w.get('candidate', '?')}  {times(w)}  {json.dumps(w['config'], sort_keys=True)}")
        for f in r["failed"]:
            lines.append(f"  failed {f['candidate']}  {f.get('phase', '')}  {f.get('check', '')}: "
                         f"{str(f.get('reason', ''))[:160]}  {json.dumps(f.get('config', {}), sort_keys=True)}")
    return "\n".join(lines)
