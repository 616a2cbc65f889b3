"""The per-GPU disk cache of tuned kernels, and the table of what is wanted.

Layout: ``$AUTOKERNEL_CACHE_DIR`` (default ``~/.cache/autokernel``) / ``<fingerprint>`` / a diskcache
database holding two kinds of records, ``runs/`` holding one folder per tuning run, and ``notes.jsonl``,
what the tuner learned on this GPU (written and read by ``autokernel.playbook.notes``).

- ``entry/<pattern key>/H=<hidden>/R=<row bucket>``: a tuned kernel for one shape bucket: the kernel
  (a configuration of a built-in family, or a complete source), its measured times and Inductor's on
  the same shape, who made it and which checks it passed, and which implementation wins for the
  forward pass and for training.
- ``wanted/<pattern key>/H=<hidden>/R=<row bucket>``: a miss seen at compile time, with an example
  shape, how often it was seen and whether any of its sightings needed a backward (``train``; an
  instance seen only under no_grad or inference_mode is tuned forward-only); ``ak-tune`` works
  through these.

The cache knows nothing of the patterns' math: a pattern key is an opaque string made by the pattern
family; a configuration is an opaque dict that the family validates when it loads it.

A cache that cannot be written (a full or read-only disk) never takes a job down: recording or
dropping a miss is best effort (logged once per cache directory and process), and a failed entry
write raises :class:`CacheWriteError`, which names the cache and the cause, for ``ak-tune`` to report.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import torch

from autokernel.cache.fingerprint import fingerprint

logger = logging.getLogger("autokernel")

ENTRY_VERSION = 1
IMPLS = ("autokernel", "inductor")
PASSES = ("fwd", "train")  # an entry without "passes" was tuned for both
_REQUIRED = {
    "version": int,
    "pattern": str,
    "pattern_key": str,
    "hidden": int,
    "row_bucket": int,
    "kernel": dict,
    "winner": dict,
    "producer": dict,
    "checks": list,
    "created": float,
}


# What a write to a diskcache database raises when it cannot write: sqlite3.OperationalError ("database
# or disk is full", or "disk I/O error" when SQLite cannot grow its shared-memory file on a full disk),
# OSError (ENOSPC creating the folder or a large value's file, EROFS, EACCES), or diskcache.Timeout.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.Error, diskcache.Timeout)
_warned: set[str] = set()  # cache paths whose failed bookkeeping writes were logged already
_warned_lock = threading.Lock()


class CacheWriteError(Exception):
    """A cache entry could not be written or deleted; the message names the cache directory and the cause."""


def describe_write_error(exc: BaseException) -> str:
    """``exc`` in words, saying so when it means the disk is full (SQLite reports ENOSPC as SQLITE_FULL)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    else:
        full = isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13) or "disk is full" in str(exc))
    if full:
        return text + " (no space left on the disk)"
    if str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_IOERR"):
        # What SQLite says when its shared-memory file cannot grow, as on a full disk.
        return text + " (the disk may be full, read-only or failing)"
    return text


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTOKERNEL_CACHE_DIR") or Path.home() / ".cache" / "autokernel").expanduser()


def row_bucket(rows: int) -> int:
    """Rows are bucketed to the next power of two: one tuned entry serves 4097..8192 rows."""
    return 1 if rows <= 1 else 1 << (int(rows) - 1).bit_length()


def entry_problem(entry: Any) -> str | None:
    """Why ``entry`` cannot be served (a description), or None when its shape is sound."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not a dict"
    for key, typ in _REQUIRED.items():
        if key not in entry:
            return f"entry lacks {key!r}"
        if not isinstance(entry[key], typ) or (typ is int and isinstance(entry[key], bool)):
            return f"entry field {key!r} is {type(entry[key]).__name__}, expected {typ.__name__}"
    if entry["version"] != ENTRY_VERSION:
        return f"entry version {entry['version']} (this autokernel reads {ENTRY_VERSION})"
    kernel = entry["kernel"]
    if kernel.get("kind") not in ("family", "source"):
        return f"kernel kind {kernel.get('kind')!r} (expected 'family' or 'source')"
    if kernel["kind"] == "family" and not isinstance(kernel.get("config"), dict):
        return "family kernel without a config dict"
    if kernel["kind"] == "source" and not isinstance(kernel.get("source"), str):
        return "source kernel without source text"
    for passname in PASSES:
        if entry["winner"].get(passname) not in IMPLS:
            return f"winner[{passname!r}] is {entry['winner'].get(passname)!r}, expected one of {IMPLS}"
    passes = entry.get("passes", list(PASSES))
    if not isinstance(passes, list) or not passes or any(p not in PASSES for p in passes):
        return f"entry field 'passes' is {passes!r}, expected a non-empty list of {PASSES}"
    return None


def tuned_passes(entry: dict[str, Any]) -> list[str]:
    """The passes an entry's kernel was tuned (searched, checked and raced) for: ``["fwd"]`` for a forward-only
    (inference) entry, both otherwise. A pass it was not tuned for is a miss, not Inductor's win."""
    return entry.get("passes", list(PASSES))


def _key(kind: str, pattern_key: str, hidden: int, bucket: int) -> str:
    return f"{kind}/{pattern_key}/H={hidden}/R={bucket}"


class KernelCache:
    """One fingerprint's namespace of the disk cache."""

    def __init__(self, root: str | os.PathLike | None = None, device: torch.device | str | None = None,
                 fingerprint_: str | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        if fingerprint_ is None:
            from autokernel.cache.fingerprint import default_device

            fingerprint_ = fingerprint(device if device is not None else default_device())
        self.fingerprint = fingerprint_
        self.path = self.root / self.fingerprint
        self._db: diskcache.Cache | None = None

    @property
    def db(self) -> diskcache.Cache:
        if self._db is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._db = diskcache.Cache(str(self.path / "db"))
        return self._db

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def notes_path(self) -> Path:
        """The tuner's notes file of this namespace (its format is the playbook's, not the cache's)."""
        return self.path / "notes.jsonl"

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _drop_connection(self) -> None:
        """Close the database after a failed write: a connection left inside a transaction whose ROLLBACK
        failed would hold SQLite's write lock against every other process; the next use reopens it."""
        try:
            self.close()
        except Exception:  # closing a broken connection may fail too; it is dropped either way
            self._db = None

    def _bookkeeping_failed(self, what: str, exc: BaseException) -> None:
        """Log a failed best-effort write once per cache directory and process: a model with many missing
        instances on a full disk gets one warning, not one per instance."""
        with _warned_lock:
            if str(self.path) in _warned:
                return
            _warned.add(str(self.path))
        logger.warning("autokernel: could not %s in %s: %s. The job runs on unchanged; further cache "
                       "write failures there are not logged again.",
                       what, self.path, describe_write_error(exc))

    # ---- entries ----
    def put_entry(self, entry: dict[str, Any]) -> str:
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"refusing to write a malformed cache entry: {problem}")
        key = _key("entry", entry["pattern_key"], entry["hidden"], entry["row_bucket"])
        try:
            self.db.set(key, entry)
        except WRITE_ERRORS as exc:
            self._drop_connection()
            raise CacheWriteError(f"could not write {key} to the cache at {self.path}: "
                                  f"{describe_write_error(exc)}") from exc
        from autokernel.cache import runtime

        runtime.invalidate(self.root)
        return key

    def entries(self) -> Iterator[tuple[str, Any]]:
        """Every entry record, sound or not (the caller checks with :func:`entry_problem`)."""
        try:
            db = self.db
        except WRITE_ERRORS as exc:
            yield from self._entries_read_only(exc)
            return
        for key in list(db.iterkeys()):
            if isinstance(key, str) and key.startswith("entry/"):
                yield key, db.get(key)

    def _entries_read_only(self, cause: BaseException) -> Iterator[tuple[str, Any]]:
        """The entries of a database that cannot be opened for writing. diskcache writes its settings when
        it opens a database, and SQLite needs room for a shared-memory file, so on a full disk (or a
        read-only mount) a tuned cache would serve nothing; read as an immutable file, it still serves."""
        db_file = self.path / "db" / diskcache.core.DBNAME
        if not db_file.is_file():
            raise cause
        logger.info("autokernel cache %s cannot be opened for writing (%s); reading its entries read-only",
                    self.path, describe_write_error(cause))
        con = sqlite3.connect(f"{db_file.resolve().as_uri()}?immutable=1", uri=True)
        try:
            rows = con.execute("SELECT key, raw, mode, filename, value FROM Cache").fetchall()
        finally:
            con.close()
        disk = diskcache.Disk(str(self.path / "db"))  # decodes values as diskcache stored them
        for db_key, raw, mode, filename, value in rows:
            key = disk.get(db_key, raw)
            if isinstance(key, str) and key.startswith("entry/"):
                yield key, disk.fetch(mode, filename, value, False)

    def delete_entry(self, key: str) -> None:
        """Remove one entry record (a key as :meth:`entries` yields it)."""
        try:
            self.db.delete(key)
        except WRITE_ERRORS as exc:
            self._drop_connection()
            raise CacheWriteError(f"could not delete {key} from the cache at {self.path}: "
                                  f"{describe_write_error(exc)}") from exc
        from autokernel.cache import runtime

        runtime.invalidate(self.root)

    # ---- wanted ----
    def record_wanted(self, pattern: str, pattern_key: str, flags: dict[str, Any], dtype: str,
                      shape: list[int], hidden: int, rows: int, train: bool = True) -> bool:
        """Count a compile-time miss (``train``: the instance needs a backward); False (logged once) when the
        cache cannot be written."""
        key = _key("wanted", pattern_key, hidden, row_bucket(rows))
        try:
            self._record_wanted(key, pattern, pattern_key, flags, dtype, shape, hidden, rows, train)
        except WRITE_ERRORS as exc:
            self._drop_connection()
            self._bookkeeping_failed("record a miss", exc)
            return False
        return True

    def _record_wanted(self, key: str, pattern: str, pattern_key: str, flags: dict[str, Any], dtype: str,
                       shape: list[int], hidden: int, rows: int, train: bool) -> None:
        with self.db.transact():
            old = self.db.get(key)
            now = time.time()
            record = {
                "pattern": pattern, "pattern_key": pattern_key, "flags": flags, "dtype": dtype,
                "shape": list(shape), "hidden": hidden, "rows": rows, "count": 1, "train": train,
                "first_seen": now, "last_seen": now,
            }
            if isinstance(old, dict):
                record["count"] = int(old.get("count", 0)) + 1
                record["first_seen"] = old.get("first_seen", now)
                # One sighting in training makes the request a training one (a record of an older autokernel,
                # without the key, counts as training too: both passes get tuned).
                record["train"] = train or bool(old.get("train", True))
            self.db.set(key, record)

    def wanted(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for key in list(self.db.iterkeys()):
            if isinstance(key, str) and key.startswith("wanted/"):
                record = self.db.get(key)
                if isinstance(record, dict):
                    out.append((key, record))
        return sorted(out, key=lambda kv: -kv[1].get("count", 0))

    def remove_wanted(self, key: str) -> bool:
        """Drop a tuned miss; False (logged once) when the cache cannot be written: the shape is only
        tuned again by a later ``ak-tune``, which must not cost the results of this one."""
        try:
            self.db.delete(key)
        except WRITE_ERRORS as exc:
            self._drop_connection()
            self._bookkeeping_failed("remove a tuned miss from the wanted table", exc)
            return False
        return True

    def clear(self) -> None:
        self.db.clear()
        from autokernel.cache import runtime

        runtime.invalidate(self.root)
