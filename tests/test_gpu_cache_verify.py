"""``ak-cache verify --rerun`` on CUDA (marker ``gpu``): every entry's kernel rechecked in this process and raced
against Inductor again through the tuner's worker child, for real (the CPU tests fake the worker's timings)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cache_verify import GOOD_SOURCE, WRONG_SOURCE, _entry

from autokernel.cache import KernelCache
from autokernel.cache import cli as cache_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

TIMES = ("fwd_ms", "train_ms", "inductor_fwd_ms", "inductor_train_ms")


def test_verify_rerun_rechecks_and_races_every_entry(tmp_path, capsys):
    cache = KernelCache(tmp_path, device="cuda")
    good = cache.put_entry(_entry(1024, GOOD_SOURCE, rows=512))
    wrong = cache.put_entry(_entry(1000, WRONG_SOURCE, rows=512))
    family = _entry(2048, GOOD_SOURCE, rows=4096)
    family["kernel"] = {"kind": "family", "config": {}}
    family = cache.put_entry(family)
    cache.close()

    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun", "--json"]) == 1
    rows = {r["key"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {good, wrong, family}
    for key in (good, family):
        # Whether our kernel still beats Inductor at these small shapes is the GPU's say: ok or stale, timed.
        assert rows[key]["status"] in ("ok", "stale"), rows[key]
        assert all(rows[key]["times"][name] > 0 for name in TIMES), rows[key]
    assert rows[wrong]["status"] == "failed" and rows[wrong]["check"] == "shape sweep", rows[wrong]
    assert not any(row["dropped"] for row in rows.values())
