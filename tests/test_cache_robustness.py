"""The cache never takes a job down: unwritable locations, and many processes at once."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import torch
from models import HFLlama

import autokernel
from autokernel.cache import KernelCache
from autokernel.playbook.tolerances import assert_close


def test_unwritable_cache_dir_costs_only_the_miss_record(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache_dir = str(blocker / "cache")  # cannot be created: its parent is a file
    torch._dynamo.reset()
    model = HFLlama(40).to(torch.bfloat16)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        y = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": cache_dir,
                                                                "autokernel.compiler": "aot_eager"})(x)
    assert_close(y, model(x).double(), torch.bfloat16, "unwritable cache")
    assert "could not record a miss" in caplog.text
    torch._dynamo.reset()
    report = autokernel.explain(model, x, options={"autokernel.cache_dir": cache_dir})
    assert [i.status for i in report.instances] == ["miss"]


WORKER = textwrap.dedent("""
    import sys, time
    from autokernel.cache import KernelCache
    root, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = KernelCache(root, fingerprint_="shared-fp")
    for i in range(n):
        cache.record_wanted("rms_norm", "rms_norm/k", {"mode": "llama"}, "bf16", [4, 64], 64, 4)
        if who == "writer":
            cache.put_entry({"version": 1, "pattern": "rms_norm", "pattern_key": f"rms_norm/w{i}", "hidden": 64,
                             "row_bucket": 4, "kernel": {"kind": "family", "config": {}},
                             "winner": {"fwd": "autokernel", "train": "autokernel"},
                             "producer": {"strategy": "test"}, "checks": [], "created": time.time()})
""")


def test_concurrent_processes_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), "writer" if i == 0 else "reader", "40"])
             for i in range(6)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 6
    cache = KernelCache(tmp_path, fingerprint_="shared-fp")
    (wanted,) = cache.wanted()
    assert wanted[1]["count"] == 6 * 40  # every recorded miss counted, none lost to a race
    assert sorted(e["pattern_key"] for _, e in cache.entries()) == sorted(f"rms_norm/w{i}" for i in range(40))


HOLDER = textwrap.dedent("""
    import sys, time
    from autokernel.cache import KernelCache
    cache = KernelCache(sys.argv[1], fingerprint_=sys.argv[2])
    with cache.db.transact():  # holds SQLite's write lock
        cache.db.set("entry/held", 1)
        print("locked", flush=True)
        time.sleep(3)
""")


def test_a_cache_locked_by_another_process_only_waits(tmp_path):
    """Another process holding the cache's write lock for seconds delays the miss record; nothing fails."""
    fp = KernelCache(tmp_path, device="cpu").fingerprint
    KernelCache(tmp_path, fingerprint_=fp).db.set("warm", 1)  # create the database first
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), fp], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    torch._dynamo.reset()
    model = HFLlama(40).to(torch.bfloat16)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    y = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path),
                                                            "autokernel.compiler": "aot_eager"})(x)
    assert holder.wait(timeout=60) == 0
    assert_close(y, model(x).double(), torch.bfloat16, "locked cache")
    assert len(KernelCache(tmp_path, fingerprint_=fp).wanted()) == 1  # recorded once the lock was free
