"""The per-GPU disk cache of tuned kernels, and the table of what is wanted.

Layout: ``$AUTOKERNEL_CACHE_DIR`` (default ``~/.cache/autokernel``) / ``<fingerprint>`` / a diskcache
database holding two kinds of records, and ``runs/`` holding one folder per tuning run.

- ``entry/<pattern key>/H=<hidden>/R=<row bucket>``: a tuned kernel for one shape bucket: the kernel
  (a configuration of a built-in family, or a complete source), its measured times and Inductor's on
  the same shape, who made it and which checks it passed, and which implementation wins for the
  forward pass and for training.
- ``wanted/<pattern key>/H=<hidden>/R=<row bucket>``: a miss seen at compile time, with an example
  shape and how often it was seen; ``ak-tune`` works through these.

The cache knows nothing of the patterns' math: a pattern key is an opaque string made by the pattern
family; a configuration is an opaque dict that the family validates when it loads it.
"""

from __future__ import annotations

import logging
import os
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
    for passname in ("fwd", "train"):
        if entry["winner"].get(passname) not in IMPLS:
            return f"winner[{passname!r}] is {entry['winner'].get(passname)!r}, expected one of {IMPLS}"
    return None


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

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---- entries ----
    def put_entry(self, entry: dict[str, Any]) -> str:
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"refusing to write a malformed cache entry: {problem}")
        key = _key("entry", entry["pattern_key"], entry["hidden"], entry["row_bucket"])
        self.db.set(key, entry)
        from autokernel.cache import runtime

        runtime.invalidate(self.root)
        return key

    def entries(self) -> Iterator[tuple[str, Any]]:
        """Every entry record, sound or not (the caller checks with :func:`entry_problem`)."""
        for key in list(self.db.iterkeys()):
            if isinstance(key, str) and key.startswith("entry/"):
                yield key, self.db.get(key)

    def delete_entry(self, key: str) -> None:
        """Remove one entry record (a key as :meth:`entries` yields it)."""
        self.db.delete(key)
        from autokernel.cache import runtime

        runtime.invalidate(self.root)

    # ---- wanted ----
    def record_wanted(self, pattern: str, pattern_key: str, flags: dict[str, Any], dtype: str,
                      shape: list[int], hidden: int, rows: int) -> None:
        key = _key("wanted", pattern_key, hidden, row_bucket(rows))
        with self.db.transact():
            old = self.db.get(key)
            now = time.time()
            record = {
                "pattern": pattern, "pattern_key": pattern_key, "flags": flags, "dtype": dtype,
                "shape": list(shape), "hidden": hidden, "rows": rows, "count": 1,
                "first_seen": now, "last_seen": now,
            }
            if isinstance(old, dict):
                record["count"] = int(old.get("count", 0)) + 1
                record["first_seen"] = old.get("first_seen", now)
            self.db.set(key, record)

    def wanted(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for key in list(self.db.iterkeys()):
            if isinstance(key, str) and key.startswith("wanted/"):
                record = self.db.get(key)
                if isinstance(record, dict):
                    out.append((key, record))
        return sorted(out, key=lambda kv: -kv[1].get("count", 0))

    def remove_wanted(self, key: str) -> None:
        self.db.delete(key)

    def clear(self) -> None:
        self.db.clear()
        from autokernel.cache import runtime

        runtime.invalidate(self.root)
