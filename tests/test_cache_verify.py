"""``ak-cache verify --rerun`` (recheck the local entries' kernels), and a full disk under the cache."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import sqlite3
import time

import diskcache
import pytest
import torch
from models import AGENT_SOURCE, HFLlama
from torch import nn

from autokernel.cache import KernelCache, row_bucket, runtime
from autokernel.cache import cli as cache_cli
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook import tuner
from autokernel.playbook.tolerances import assert_close

FLAGS = {"mode": "llama", "offset": 0.0, "weight": "bf16", "out": "bf16"}
KEY = pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16)
# Tagged: a source loads once per process (sources.load_source), and tests/test_source_entries.py counts the
# files its own first load of AGENT_SOURCE writes.
GOOD_SOURCE = AGENT_SOURCE + "\n# tests/test_cache_verify.py\n"
# A math error: dx 10% too large, which the shape sweep catches.
WRONG_SOURCE = GOOD_SOURCE.replace("dx = r * (g - n *", "dx = 1.1 * r * (g - n *")


def _entry(hidden: int, source: str, rows: int = 7) -> dict:
    return {
        "version": 1, "pattern": "rms_norm", "pattern_key": KEY, "hidden": hidden, "row_bucket": row_bucket(rows),
        "shape": [rows, hidden], "dtype": "bf16", "flags": dict(FLAGS),
        "kernel": {"kind": "source", "source": source, "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "agent"},
        "checks": [], "created": time.time(), "times": {"fwd_ms": 1.0, "train_ms": 2.0},
    }


def test_verify_rerun_reports_drops_only_the_wrong_kernel(tmp_path, capsys):
    cache = KernelCache(tmp_path, device="cpu")
    good = cache.put_entry(_entry(40, GOOD_SOURCE))
    bad = cache.put_entry(_entry(48, WRONG_SOURCE))

    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun"]) == 1
    captured = capsys.readouterr()
    lines = {line.split()[1]: line for line in captured.out.splitlines() if line.startswith("  ")}
    assert lines[good].split()[0] == "ok" and "not timed (interpreter)" in lines[good]
    assert lines[bad].split()[0] == "FAILED" and f"{bad}  shape sweep: " in lines[bad] and " dx" in lines[bad]
    assert "2 entries rechecked: 1 ok, 1 failed, 0 stale, 0 unusable" in captured.out
    assert "[ak-cache verify] 2/2 " in captured.err  # progress goes to stderr
    assert sorted(k for k, _ in cache.entries()) == sorted([good, bad])  # flagged, not deleted

    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun", "--json", "--drop-failed"]) == 1
    rows = {r["key"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[good]["status"] == "ok" and rows[good]["dropped"] is False
    assert rows[bad]["status"] == "failed" and rows[bad]["check"] == "shape sweep" and rows[bad]["dropped"] is True
    assert [k for k, _ in cache.entries()] == [good]

    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun"]) == 0
    assert "1 entries rechecked: 1 ok, 0 failed" in capsys.readouterr().out


def test_verify_rerun_unusable_entries_and_arguments(tmp_path, capsys, monkeypatch):
    cache = KernelCache(tmp_path, device="cpu")
    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun"]) == 0
    assert f"{cache.path}: no entries to recheck" in capsys.readouterr().out
    no_flags = _entry(40, GOOD_SOURCE)
    del no_flags["flags"]  # sound enough to serve, but the checks cannot build its problem
    cache.put_entry(no_flags)
    cache.db.set("entry/rms_norm/bogus/H=1/R=1", {"version": 1})
    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun", "--json", "--drop-failed"]) == 1
    rows = {r["key"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["entry/rms_norm/bogus/H=1/R=1"]["status"] == "unusable"
    assert rows["entry/rms_norm/bogus/H=1/R=1"]["dropped"] is False  # perhaps a newer autokernel's: ak-cache rm
    (setup,) = [r for k, r in rows.items() if "bogus" not in k]
    assert setup["status"] == "failed" and setup["check"] == "setup" and "'flags'" in setup["detail"]
    assert [k for k, _ in cache.entries()] == ["entry/rms_norm/bogus/H=1/R=1"]
    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "b.akc", "--rerun"]) == 2
    assert "takes no bundle" in capsys.readouterr().err
    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--drop-failed"]) == 2
    assert "go with --rerun" in capsys.readouterr().err
    # Without a GPU the checks need the interpreter, which must be chosen before triton is imported.
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cache_cli.main(["--cache-dir", str(tmp_path), "verify", "--rerun"]) == 2
    assert "run it with TRITON_INTERPRET=1" in capsys.readouterr().err


class FakeWorker:
    """The tuner's worker protocol with canned answers: what a GPU would reply, without one."""

    replies: dict[str, dict] = {}
    calls: list[tuple] = []

    def __init__(self, request, device, max_rows, timeout_s):
        assert max_rows is None  # the race runs at the tuned shape, not the checks' few rows
        FakeWorker.calls.append(("start", request.pattern, request.shape))

    def retarget(self, request, max_rows):
        assert max_rows is None
        FakeWorker.calls.append(("retarget", request.pattern, request.shape))

    def call(self, *request):
        FakeWorker.calls.append(request[:1])
        return FakeWorker.replies[request[0]]

    def stop(self):
        FakeWorker.calls.append(("stop",))


@pytest.mark.parametrize(("inductor_train_ms", "status"), [(1.8, "stale"), (1.95, "ok")])
def test_timed_rerun_races_inductor_through_the_worker(tmp_path, monkeypatch, inductor_train_ms, status):
    """On a GPU the entry is raced again through the tuner's worker; Inductor more than a few % faster on a
    served pass makes it stale (a GPU is faked here: the CPU checks are real, the timings canned)."""
    monkeypatch.setattr(tuner, "Worker", FakeWorker)
    FakeWorker.calls = []
    FakeWorker.replies = {
        "bandwidth": {"status": "ok", "copy_gbps": 1000.0},
        "inductor": {"status": "ok", "fwd_ms": 1.5, "train_ms": inductor_train_ms},
        "candidate": {"status": "ok", "checks": [], "fwd_ms": 1.0, "train_ms": 2.0},
    }
    result = cache_cli.recheck_entry(_entry(40, GOOD_SOURCE, rows=12), torch.device("cpu"), timed=True)
    assert result["status"] == status
    assert result["times"] == {"fwd_ms": 1.0, "train_ms": 2.0, "inductor_fwd_ms": 1.5,
                               "inductor_train_ms": inductor_train_ms}
    assert FakeWorker.calls == [("start", "rms_norm", [12, 40]), ("retarget", "rms_norm", [12, 40]), ("inductor",),
                                ("candidate",), ("stop",)]
    if status == "stale":
        assert "Inductor now faster: train 1.8000 ms vs ours 2.0000 ms" in result["detail"]
    # A pass the entry already leaves to Inductor is not served: Inductor winning it is no news.
    entry = _entry(40, GOOD_SOURCE)
    entry["winner"]["train"] = "inductor"
    assert cache_cli.judge_race(entry, result["times"])["status"] == "ok"
    # A problem served slower for its memory (linear + CE's 5% slack) is stale only beyond the slack too.
    slower = {"fwd_ms": 1.0, "train_ms": 2.0, "inductor_fwd_ms": 1.5, "inductor_train_ms": 1.85}
    assert cache_cli.judge_race(_entry(40, GOOD_SOURCE), slower)["status"] == "stale"
    assert cache_cli.judge_race(_entry(40, GOOD_SOURCE), slower, slack=0.05)["status"] == "ok"
    assert cache_cli.judge_race(_entry(40, GOOD_SOURCE), {**slower, "inductor_train_ms": 1.8},
                                slack=0.05)["status"] == "stale"
    # The kernel failing its checks at the full shape in the worker is a failure naming the check.
    FakeWorker.replies["candidate"] = {"status": "failed", "stage": "stability", "detail": "dx: too far"}
    failed = cache_cli.recheck_entry(_entry(40, GOOD_SOURCE, rows=12), torch.device("cpu"), timed=True)
    assert (failed["status"], failed["check"]) == ("failed", "stability") and "at 12x40" in failed["detail"]


def test_one_worker_races_every_entry(monkeypatch):
    """ak-cache verify --rerun starts one worker child for all the entries (a start costs seconds): the racer
    retargets it from entry to entry and stops it once."""
    monkeypatch.setattr(tuner, "Worker", FakeWorker)
    FakeWorker.calls = []
    FakeWorker.replies = {
        "inductor": {"status": "ok", "fwd_ms": 1.5, "train_ms": 3.0},
        "candidate": {"status": "ok", "checks": [], "fwd_ms": 1.0, "train_ms": 2.0},
    }
    racer = cache_cli.Racer(torch.device("cpu"), 60.0)
    try:
        first = cache_cli.recheck_entry(_entry(40, GOOD_SOURCE, rows=12), torch.device("cpu"), True, racer=racer)
        second = cache_cli.recheck_entry(_entry(48, GOOD_SOURCE, rows=5), torch.device("cpu"), True, racer=racer)
    finally:
        racer.close()
    assert [first["status"], second["status"]] == ["ok", "ok"]
    assert FakeWorker.calls == [
        ("start", "rms_norm", [12, 40]), ("retarget", "rms_norm", [12, 40]), ("inductor",), ("candidate",),
        ("retarget", "rms_norm", [5, 48]), ("inductor",), ("candidate",), ("stop",)]


# ---- a full disk under the cache ----

def _disk_full(*args, **kwargs):
    # What SQLite reports when a write hits ENOSPC (checked on a real full tmpfs: SQLITE_FULL).
    raise sqlite3.OperationalError("database or disk is full")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = HFLlama(40), HFLlama(40)

    def forward(self, x):
        return self.b(self.a(x) * 2)


@pytest.mark.parametrize("where", ["write", "open", "mkdir"])
def test_full_disk_costs_only_the_miss_records(tmp_path, monkeypatch, caplog, where):
    """Two missing instances on a full disk: nothing recorded, one warning naming the cache and the cause,
    and the right answer. ``where``: the record's write fails (an existing database), opening a new
    database fails, or the namespace's folder cannot be made."""
    cache = KernelCache(tmp_path, device="cpu")
    if where == "write":
        cache.db.set("warm", 1)  # an existing database
        cache.close()
        monkeypatch.setattr(diskcache.Cache, "set", _disk_full)
    elif where == "open":
        monkeypatch.setattr(diskcache.Cache, "__init__", _disk_full)
    else:
        monkeypatch.setattr(type(cache.path), "mkdir", _no_space)
    torch._dynamo.reset()
    runtime.invalidate()
    model = TwoNorms().to(torch.bfloat16)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        y = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path),
                                                                "autokernel.compiler": "aot_eager"})(x)
    monkeypatch.undo()
    torch._dynamo.reset()
    assert_close(y, model(x).double(), torch.bfloat16, "full disk")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"could not record a miss in {cache.path}: " in warnings[0]
    assert "(no space left on the disk)" in warnings[0]
    assert KernelCache(tmp_path, device="cpu").wanted() == []


def test_a_tuned_cache_on_a_full_disk_still_serves(tmp_path, monkeypatch, caplog):
    """Opening a diskcache database writes (its settings, SQLite's shared-memory file), which a full disk or a
    read-only mount refuses (seen on a real full tmpfs); the entries are still read and served."""
    import autokernel

    entry = _entry(40, GOOD_SOURCE, rows=5)
    entry["kernel"] = {"kind": "family", "config": {}}
    cache = KernelCache(tmp_path, device="cpu")
    key = cache.put_entry(entry)
    cache.close()
    monkeypatch.setattr(diskcache.Cache, "__init__", _disk_full)
    runtime.invalidate()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        report = autokernel.explain(TwoNorms().to(torch.bfloat16), torch.randn(5, 40, dtype=torch.bfloat16),
                                    options={"autokernel.cache_dir": str(tmp_path)})
    assert [i.status for i in report.instances] == ["hit", "hit"]
    assert caplog.text == ""
    assert [(k, e["kernel"]) for k, e in KernelCache(tmp_path, device="cpu").entries()] == [(key, entry["kernel"])]
    runtime.invalidate()
    torch._dynamo.reset()


class _FullFile:
    """A file on a disk that fills up after its first write (results.tsv keeps its header)."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, text):
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_ak_tune_on_a_full_disk_reports_and_goes_on(tmp_path, monkeypatch, capsys, caplog):
    """The first shape's entry cannot be written; the second shape's results.tsv fills the disk after its
    header. Each is reported in one line, the second's entry is written, and the exit code says so."""
    from autokernel.playbook import cli

    cache = KernelCache(tmp_path, device="cpu")
    for hidden, seen in ((32, 2), (48, 1)):  # 32 is tuned first: seen more often
        for _ in range(seen):
            cache.record_wanted("rms_norm", KEY, FLAGS, "bf16", [4, hidden], hidden, 4)
    real_set, real_open = diskcache.Cache.set, builtins.open

    def set_(self, key, *args, **kwargs):
        if isinstance(key, str) and key.startswith("entry/") and "/H=32/" in key:
            _disk_full()
        return real_set(self, key, *args, **kwargs)

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _FullFile(f) if "-4x48-" in str(path) else f

    monkeypatch.setattr(diskcache.Cache, "set", set_)
    monkeypatch.setattr(tuner, "open", open_, raising=False)
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        assert cli.main(["--cache-dir", str(tmp_path), "-q"]) == 1
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err + caplog.text
    (line32,) = [line for line in out.splitlines() if line.startswith("rms_norm 4x32 bf16")]
    assert f"error: could not write entry/{KEY}/H=32/R=4 to the cache at {cache.path}: OperationalError: " \
           "database or disk is full (no space left on the disk)" in line32
    assert "rerun ak-tune once the cache can be written" in line32
    (run32,) = cache.runs_dir.glob("*-4x32-*")
    assert len((run32 / "results.tsv").read_text().splitlines()) >= 3 and not (run32 / "done").exists()
    (run48,) = cache.runs_dir.glob("*-4x48-*")
    assert (run48 / "results.tsv").read_text().splitlines()[0].startswith("n\tphase\tstatus")
    assert (run48 / "done").read_text().strip() == "written"
    assert "results.tsv incomplete: could not write" in out and "No space left on device" in caplog.text
    assert [e["hidden"] for _, e in cache.entries()] == [48]
    assert [w["hidden"] for _, w in cache.wanted()] == [32]  # still wanted: tuned again by the next ak-tune
