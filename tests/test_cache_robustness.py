"""The cache never takes a job down: unwritable locations, and many processes at once."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch
from models import HFLlama

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.cache.store import entry_problem
from autokernel.lowering.rms_norm.ops import pattern_key
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


STRESS_WORKER = Path(__file__).with_name("cache_stress_worker.py")
LLAMA_BF16 = pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16)


def _subprocess_env(cache_dir: Path) -> dict[str, str]:
    # A CPU test on any machine: on a GPU machine ak-tune would otherwise tune for the GPU's namespace,
    # which the workers' CPU tensors never look up.
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOKERNEL_CACHE_DIR=str(cache_dir), CUDA_VISIBLE_DEVICES="")
    env.pop("AUTOKERNEL_VERIFY", None)  # rechecking every entry would only add minutes
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the children waited for so far
    return usage.ru_utime + usage.ru_stime


def _start_worker(cache_dir: Path, out_dir: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    # Files, not pipes: eight chatty children must never block on a full pipe while the test runs ak-tune.
    out, err = out_dir / f"{name}.out", out_dir / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(STRESS_WORKER), *args], stdout=fo, stderr=fe,
                                env=_subprocess_env(cache_dir))
    return proc, out, err


def _ak_tune(cache_dir: Path, shape: str) -> list[str]:
    """Run ak-tune on one RMSNorm shape; the shapes its summary reports as written."""
    result = subprocess.run([sys.executable, "-m", "autokernel.playbook.cli", "--pattern", "rms_norm", "--shape",
                             shape, "--dtype", "bf16", "-q"], capture_output=True, text=True,
                            env=_subprocess_env(cache_dir), timeout=300)
    assert result.returncode == 0, (f"ak-tune {shape} exited {result.returncode}:\n"
                                    f"{result.stdout}{result.stderr[-3000:]}")
    # The summary table's columns: pattern, shape, dtype, status, ...
    return [row.split()[1] for row in result.stdout.splitlines()
            if row.startswith("rms_norm ") and row.split()[3] == "written"]


def test_eight_models_and_ak_tune_share_one_cache(tmp_path):
    """8 processes compile and run HFLlama against one cache (missing, recording, serving entries) while
    ak-tune writes entries into it: nobody crashes or sees a malformed entry, every output matches
    float64, every written entry is there and sound, and the wanted counts are exactly the misses seen."""
    cache_dir, logs = tmp_path / "cache", tmp_path / "logs"
    logs.mkdir()
    first, done = tmp_path / "first-entry-written", tmp_path / "ak-tune-finished"
    # ak-tune writes H=32, then H=48 (a lookup serves any rows of a tuned hidden size); nobody tunes H=96.
    # Each worker: round 1 (H=32 a miss or a hit, H=96 a miss) while ak-tune tunes H=32; round 2 (H=48
    # either, H=32 served) while it tunes H=48; the last round (H=48 served) after it has finished.
    tuned = ["8x32", "16x48"]
    workers = [_start_worker(cache_dir, logs, f"worker{i}", [
        f"{3 + i}x32,{5 + 2 * i}x96", str(first),
        f"{9 + i}x48,{4 + i}x32", str(done),
        f"{20 + i}x48"]) for i in range(8)]
    t0, cpu0 = time.time(), _children_cpu()
    written: list[str] = []
    try:
        written += _ak_tune(cache_dir, tuned[0])
        first.write_text("")
        written += _ak_tune(cache_dir, tuned[1])
        tune_cpu = _children_cpu() - cpu0
    finally:
        first.write_text("")  # release the workers even when ak-tune failed: their logs tell more
        done.write_text("")
        codes: list[int | str] = []
        for proc, _out, _err in workers:
            try:
                codes.append(proc.wait(timeout=300))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("hung: killed after 300 s")
    wall, cpu = time.time() - t0, _children_cpu() - cpu0
    for (_proc, out, err), code in zip(workers, codes, strict=True):
        assert code == 0, f"{out.name} exited {code}:\n{out.read_text()[-2000:]}\n{err.read_text()[-4000:]}"
    reports = [json.loads(out.read_text().splitlines()[-1]) for _proc, out, _err in workers]
    assert all(r["warnings"] == [] for r in reports), [r["warnings"] for r in reports]

    # Under the interpreter the best correct candidate always wins: each shape asked for is written.
    assert sorted(written) == sorted(tuned)
    cache = KernelCache(cache_dir, device="cpu")
    entries = dict(cache.entries())
    for shape in written:
        rows, hidden = (int(p) for p in shape.split("x"))
        key = f"entry/{LLAMA_BF16}/H={hidden}/R={row_bucket(rows)}"
        assert key in entries, f"ak-tune wrote {shape} but {key} is not in the cache (keys: {sorted(entries)})"
        assert entry_problem(entries[key]) is None, f"{key}: {entry_problem(entries[key])}"
        assert entries[key]["shape"] == [rows, hidden]
    assert len(entries) == len(written)

    # What each compile did follows from what was written before it started (hit or miss, never declined);
    # the workers checked every output, served or not, against float64.
    for i, r in enumerate(reports):
        assert all(status in ("hit", "miss") for rnd in r["rounds"] for _rows, _h, status in rnd), r
        # One instance per compile, in compile order: a worker whose log lines went unrecognized would
        # report none, and the counts below would prove nothing.
        seen = [[(h, status) for _rows, h, status in rnd] for rnd in r["rounds"]]
        assert [[h for h, _ in rnd] for rnd in seen] == [[32, 96], [48, 32], [48]], f"worker{i}: {r}"
        assert (seen[0][1][1], seen[1][1][1], seen[2][0][1]) == ("miss", "hit", "hit"), f"worker{i}: {r}"
        # Between rounds it reread the entry table (once more after the wait was over): it saw what ak-tune
        # had written by then and nothing else (JSON made the hidden sizes strings).
        assert [set(w["first_seen"]) for w in r["waits"]] == [{"32"}, {"32", "48"}], f"worker{i}: {r}"

    # Every miss a worker saw was recorded once, and every hit served by another row bucket's entry (its own
    # bucket is wanted too): the wanted table's counts are exactly those.
    tuned_bucket = {int(shape.split("x")[1]): row_bucket(int(shape.split("x")[0])) for shape in written}
    expected = Counter((LLAMA_BF16, h, row_bucket(rows)) for r in reports for rnd in r["rounds"]
                       for rows, h, status in rnd
                       if status == "miss" or tuned_bucket.get(h) != row_bucket(rows))
    recorded = Counter({(w["pattern_key"], w["hidden"], row_bucket(w["rows"])): w["count"] for _k, w in cache.wanted()})
    cache.close()
    assert recorded == expected, f"wanted table {dict(recorded)} != misses the workers saw {dict(expected)}"
    # How much the reads overlapped ak-tune's second write depends on timing: reported, not asserted.
    reads = sum(w["reads"] for r in reports for w in r["waits"])
    saw_48 = sum(r["waits"][1]["first_seen"]["48"] < r["waits"][1]["reads"] - 1 for r in reports)
    compiles = sum(len(rnd) for r in reports for rnd in r["rounds"])
    print(f"\n{len(workers)} workers: {compiles} compiles, {sum(expected.values())} wanted sightings, {reads} table "
          f"reads ({saw_48} workers saw the second entry before ak-tune ended); {len(written)} ak-tune entries; "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU ({tune_cpu:.1f} s of it ak-tune's)")


def test_the_stress_worker_fails_on_a_malformed_entry(tmp_path):
    """The check above means something: a worker that meets a malformed entry (what a torn read would look
    like) exits 1 naming it, although its model still runs correctly on Inductor."""
    cache = KernelCache(tmp_path, device="cpu")
    cache.db.set(f"entry/{LLAMA_BF16}/H=32/R=4", {"version": 1, "pattern": "rms_norm"})  # half an entry
    cache.close()
    proc, out, err = _start_worker(tmp_path, tmp_path, "worker", ["4x32"])
    assert proc.wait(timeout=300) == 1, out.read_text() + err.read_text()[-3000:]
    report = json.loads(out.read_text().splitlines()[-1])
    assert report["rounds"] == [[[4, 32, "miss"]]]  # served by Inductor, output checked against float64
    assert len(report["warnings"]) == 1 and f"skipping entry/{LLAMA_BF16}/H=32/R=4: entry lacks" \
        in report["warnings"][0], report["warnings"]
