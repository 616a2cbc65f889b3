"""What the ops read at run time: a small in-memory table built once from the disk cache.

A cache hit must cost no disk read per call, so the first lookup for a (cache dir, fingerprint)
loads every sound entry into a dict keyed by (pattern key, hidden size) -> {row bucket: entry}; later
lookups are dict reads. A write through :class:`KernelCache` invalidates the table of its cache dir.
Malformed entries (a corrupt or foreign record) are logged once and skipped: a bad cache never
breaks a model, it only loses the tuned configuration.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import torch

from autokernel.cache.fingerprint import fingerprint
from autokernel.cache.store import KernelCache, entry_problem, row_bucket

logger = logging.getLogger("autokernel")

_Table = dict[tuple[str, int], dict[int, dict[str, Any]]]
_tables: dict[tuple[str, str], _Table] = {}
_lock = threading.Lock()
# What the ops derived from the tables (e.g. a validated config per shape bucket): a dict read per call
# instead of re-deriving; emptied with the tables.
memo: dict[tuple, object] = {}


def _load(root: str, fp: str) -> _Table:
    table: _Table = {}
    cache = KernelCache(root, fingerprint_=fp)
    try:
        if not cache.path.exists():
            return table
        for key, entry in cache.entries():
            problem = entry_problem(entry)
            if problem:
                logger.warning("autokernel cache %s: skipping %s: %s", cache.path, key, problem)
                continue
            table.setdefault((entry["pattern_key"], entry["hidden"]), {})[entry["row_bucket"]] = entry
    except Exception as exc:  # a corrupt database must not break the model
        logger.warning("autokernel cache %s/%s unreadable, serving no tuned kernels: %s", root, fp, exc)
    finally:
        cache.close()
    return table


def table_for(root: str | Path, device: torch.device) -> _Table:
    key = (str(root), fingerprint(device))
    table = _tables.get(key)
    if table is None:
        with _lock:
            table = _tables.get(key)
            if table is None:
                table = _tables[key] = _load(*key)
    return table


def invalidate(root: str | Path | None = None) -> None:
    """Forget loaded tables (of one cache dir, or all) so the next lookup rereads the disk."""
    with _lock:
        for key in list(_tables):
            if root is None or key[0] == str(root):
                del _tables[key]
        memo.clear()


def lookup(root: str | Path, device: torch.device, pattern_key: str, hidden: int, rows: int) -> dict | None:
    """The entry for this shape: the exact row bucket, else the nearest tuned one for the same hidden size."""
    buckets = table_for(root, device).get((pattern_key, hidden))
    if not buckets:
        return None
    want = row_bucket(rows)
    entry = buckets.get(want)
    if entry is None:
        nearest = min(buckets, key=lambda b: abs(math.log2(b) - math.log2(want)))
        entry = buckets[nearest]
    return entry
