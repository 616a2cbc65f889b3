"""The playbook's notes store: what a tuning run learned (winner, failed candidates) is appended per GPU, and the
next run starts from it (warm start) and skips what failed on the same shape; results.tsv and progress.png."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from autokernel.cache import KernelCache
from autokernel.lowering import families
from autokernel.playbook import cli
from autokernel.playbook.notes import NotesStore, candidate_id
from autokernel.playbook.rules import CHAPTERS, RULES, playbook_for
from autokernel.playbook.tuner import TuneRequest, tune

SHAPE = [6, 40]
REQUEST = TuneRequest("rms_norm", {"mode": "llama"}, "bf16", SHAPE)
CPU = torch.device("cpu")


def _rows(result) -> list[dict[str, str]]:
    with open(Path(result.run_dir) / "results.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _append_many(path: str, worker: int, count: int) -> None:
    store = NotesStore(path)
    for i in range(count):
        assert store.append({"v": 1, "pattern": "p", "pattern_key": "p/k", "hidden": 8, "row_bucket": 1,
                             "shape": [1, 8], "winner": None, "run": f"{worker}-{i}", "padding": "x" * 5000,
                             "failed": [{"candidate": f"{worker}-{i}", "check": "smoke", "reason": "r"}]})


def test_concurrent_writers_and_a_torn_line(tmp_path, caplog):
    """Four processes append at once; a line cut off (a full disk, a killed writer) is closed off by the next
    append and skipped by readers with one warning; every record survives whole."""
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"v": 1, "pattern": "cut of')
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        records = NotesStore(path).records()
        NotesStore(path).records()
    assert sorted(r["run"] for r in records) == sorted(f"{w}-{i}" for w in range(4) for i in range(25))
    assert len(caplog.records) == 1 and "1 unreadable line(s) skipped, first line 1" in caplog.text
    assert len(NotesStore(path).failures("p/k", 8, 1)) == 100


def test_playbook_is_data_that_refers_to_the_problem(capsys):
    problem = families()["rms_norm"].problem({"mode": "llama"}, "bf16", [4096, 8192], CPU)
    book = playbook_for(problem)
    assert book["floor"]["bytes"] == problem.bytes_moved() and "DRAM" in book["floor"]["formula"]
    assert book["parameter_space"]["bwd"]["bwd_programs_per_sm"] == [1, 2, 4, 8, 16]
    assert [r["key"] for r in book["rules"]] == list(CHAPTERS["rms_norm"].rules)
    assert all(o["gpu"] and o["source"] for r in RULES.values() for o in map(vars, r.observed))
    assert all(set(c.rules) <= set(RULES) for c in CHAPTERS.values())
    json.dumps(book)  # plain data: the agent reads it as JSON
    assert cli.main(["--playbook", "--pattern", "rms_norm"]) == 0
    out = capsys.readouterr().out
    assert "split-huge-rows: " in out and "measured on NVIDIA H100" in out and "swiglu:" not in out


def _agent_script(config: dict) -> list:
    from messages_server import message, tool
    from test_agent import WRONG  # skips the test when the anthropic SDK is missing

    return [message([tool("read_task")]), message([tool("submit_kernel", source=WRONG, config=config)]),
            message([{"type": "text", "text": "Done."}], stop="end_turn")]


def _tool_results(server, prefix: str) -> list[dict]:
    """The tool results the agent got back (the last request holds the whole conversation)."""
    return [json.loads(c["content"]) for m in server.requests[-1]["body"]["messages"]
            if m["role"] == "user" and isinstance(m["content"], list) for c in m["content"]
            if c.get("type") == "tool_result" and c["tool_use_id"].startswith(prefix)]


def _tune_with_agent(cache: KernelCache, config: dict, **kwargs) -> tuple:
    """A tuning run whose agent (a scripted Messages API server) reads its task and submits a kernel that
    computes a wrong dx with ``config``; the run's result and the tool results the agent got back."""
    from messages_server import MessagesServer

    server = MessagesServer(_agent_script(config))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANTHROPIC_BASE_URL", server.url)
            mp.setenv("ANTHROPIC_API_KEY", "test-key-not-real")
            result = tune(REQUEST, cache, CPU, budget_s=600, timeout_s=60, **kwargs)
    finally:
        server.close()
    return result, _tool_results(server, "toolu_read_task"), _tool_results(server, "toolu_submit")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Run 1: the search, then an agent whose kernel fails its checks."""
    cache = KernelCache(tmp_path_factory.mktemp("notes"), device="cpu")
    config = families()["rms_norm"].problem({"mode": "llama"}, "bf16", SHAPE, CPU).default_candidate()
    result, tasks, _verdicts = _tune_with_agent(cache, config, strategy="both")
    return cache, config, result, tasks


def test_a_run_notes_its_winner_and_failed_candidates(first_run):
    from test_agent import WRONG

    cache, config, first, tasks = first_run
    assert first.status == "written"
    rows = _rows(first)
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["strategy"] == "agent" and failed["candidate"] == candidate_id({**config, "source": WRONG})
    assert failed["check_failed"] in ("shape sweep", "stability", "edge cases")
    assert all(r["time"] and r["shape"] == "6x40" for r in rows)
    assert all(r["ms"] == r["fwd_ms" if r["phase"] == "fwd" else "train_ms"] for r in rows if r["status"] == "ok")
    (task,) = tasks
    assert task["playbook"]["rules"] and task["notes_on_this_gpu"]["gpu"] == cache.fingerprint
    (note,) = NotesStore(cache.notes_path).records()
    assert note["run"] == Path(first.run_dir).name and note["status"] == "written"
    assert note["winner"]["kind"] == "family" and note["winner"]["config"] == first.best
    assert [(f["candidate"], f["check"]) for f in note["failed"]] == [(failed["candidate"], failed["check_failed"])]


def test_progress_png(first_run):
    pytest.importorskip("matplotlib", reason="progress.png is drawn only when matplotlib is installed")
    png = Path(first_run[2].run_dir) / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_next_run_starts_from_the_notes_and_skips_known_failures(first_run, capsys):
    """Run 2 on the same shape, with the cache entry gone, starts from the noted winner and does not run
    the failed kernel again; --retry-failed runs it."""
    cache, config, first, _tasks = first_run
    (note,) = NotesStore(cache.notes_path).records()
    (wrong,) = note["failed"]
    # The entry is gone (say, ak-cache rm): the warm start can only come from the notes.
    (key,) = [k for k, _ in cache.entries()]
    cache.delete_entry(key)
    second, (task,), (verdict,) = _tune_with_agent(cache, config, strategy="both")
    rows = _rows(second)
    assert rows[0]["strategy"] == "warm start" and json.loads(rows[0]["config"]) == first.best
    assert f"notes: run {note['run']}" in rows[0]["notes"]
    (skipped,) = [r for r in rows if r["phase"] == "agent" and r["candidate"]]
    assert skipped["status"] == "skipped" and skipped["n"] == "" and skipped["candidate"] == wrong["candidate"]
    assert note["run"] in skipped["notes"] and "--retry-failed" in skipped["notes"]
    assert verdict["status"] == "skipped" and wrong["check"] in verdict["detail"]
    seen = task["notes_on_this_gpu"]
    assert seen["winners_nearest_first"][0]["config"] == first.best
    assert [f["candidate"] for f in seen["failed_on_this_shape"]] == [wrong["candidate"]]

    assert cli.main(["--notes", "--pattern", "rms_norm", "--cache-dir", str(cache.root)]) == 0
    out = capsys.readouterr().out
    assert "2 run(s)" in out and f"failed {wrong['candidate']}" in out
    assert f"winner {note['winner']['candidate']}" in out

    third, _tasks, (verdict,) = _tune_with_agent(cache, config, strategy="agent", retry_failed=True)
    assert verdict["status"] == "failed"
    assert [r["status"] for r in _rows(third) if r["phase"] == "agent" and r["candidate"]] == ["failed"]


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_a_broken_notes_store_costs_one_warning(tmp_path, caplog, damage):
    cache = KernelCache(tmp_path, device="cpu")
    cache.notes_path.parent.mkdir(parents=True)
    if damage == "corrupt":
        key = families()["rms_norm"].problem({"mode": "llama"}, "bf16", SHAPE, CPU).key
        bad_shape = {"v": 1, "pattern": "rms_norm", "pattern_key": key, "hidden": 0, "row_bucket": 8,
                     "shape": [8, 0], "failed": [], "winner": {"config": {}}}  # typed right, a size of 0
        cache.notes_path.write_text(f'not json\n{{"v": 1}}\n[1, 2]\n{json.dumps(bad_shape)}\n')
    else:
        cache.notes_path.mkdir()  # neither readable nor writable as a file
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        result = tune(REQUEST, cache, CPU, budget_s=600)
    assert result.status == "written" and len(list(cache.entries())) == 1
    assert result.served == REQUEST.passes  # the interpreter races nothing: every tuned pass is ours
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache.notes_path) in warnings[0].getMessage(), caplog.text
    if damage == "corrupt":  # the run's own record is readable after the bad lines
        assert [r["run"] for r in NotesStore(cache.notes_path).records()] == [Path(result.run_dir).name]


def test_resume_reads_a_results_tsv_of_the_old_format(tmp_path):
    """A run killed under an older autokernel (ten columns) is resumed, and what it learned reaches the notes."""
    from autokernel.playbook.tuner import _interrupted_run, _Learned

    ok, bad = {"fwd_num_warps": 1}, {"fwd_num_warps": 3}
    run = tmp_path / "20260101-000000-rms_norm-6x40-bf16-abcd1234"
    run.mkdir()
    with open(run / "results.tsv", "w", newline="") as f:
        old = csv.writer(f, delimiter="\t")
        old.writerow(["n", "phase", "status", "fwd_ms", "train_ms", "speedup_vs_inductor", "pct_of_floor",
                      "seconds", "config", "detail"])
        old.writerow([1, "fwd", "ok", "1.0", "2.0", "", "", "0.1", json.dumps(ok), ""])
        old.writerow([2, "fwd", "failed", "", "", "", "", "0.1", json.dumps(bad), "smoke: ValueError: warps"])
        old.writerow([3, "bwd", "crashed", "", "", "", "", "9.0", json.dumps(ok), "no answer within 9 s (hang?)"])
    old_dir, rows = _interrupted_run(tmp_path, "rms_norm-6x40-bf16-abcd1234")
    assert old_dir == run and [r["status"] for r in rows] == ["ok", "failed", "crashed"]
    learned = _Learned()
    learned.adopt(rows)
    assert learned.passed == {candidate_id(ok)}
    assert [(f["candidate"], f["check"]) for f in learned.failed] == [(candidate_id(bad), "smoke"),
                                                                      (candidate_id(ok), "hang")]


def test_no_matplotlib_no_picture(tmp_path, monkeypatch, caplog):
    """Without matplotlib (not a dependency of autokernel) there is no progress.png, and only a debug line."""
    from autokernel.playbook.tuner import plot_progress

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without matplotlib gives
    rows = [{"n": 1, "status": "ok", "fwd_ms": "1.0", "train_ms": "2.0"}]
    with caplog.at_level(logging.DEBUG, logger="autokernel"):
        assert plot_progress(tmp_path / "progress.png", rows, "t", {}, {}) is False
    assert not (tmp_path / "progress.png").exists()
    assert [r.levelname for r in caplog.records] == ["DEBUG"] and "matplotlib is not installed" in caplog.text


def test_forward_phase_yields_to_the_backward_phase():
    """A training request's forward phase stops after its share of the budget once it has a passing candidate;
    a forward-only request's forward phase, and a forward phase with nothing passing yet, go on."""
    from autokernel.playbook.tuner import FWD_BUDGET_SHARE, _forward_share_spent

    late = FWD_BUDGET_SHARE * 100 + 1
    assert _forward_share_spent("fwd", ("fwd", "bwd"), late, 100, True)
    assert not _forward_share_spent("fwd", ("fwd", "bwd"), late, 100, False)
    assert not _forward_share_spent("fwd", ("fwd", "bwd"), FWD_BUDGET_SHARE * 100 - 1, 100, True)
    assert not _forward_share_spent("fwd", ("fwd",), late, 100, True)
    assert not _forward_share_spent("bwd", ("fwd", "bwd"), late, 100, True)


def test_each_phase_starts_from_the_default():
    """A short budget runs about one candidate a phase: that one is the family's default, not the first knob value
    of the space (an RMSNorm 8192x4096 backward with 2 warps a program took 1.18 ms on the H100, the default ~0.13).
    Every candidate of the space still runs once."""
    from autokernel.lowering.rms_norm.problem import RmsNormProblem
    from autokernel.lowering.swiglu.problem import SwigluProblem
    from autokernel.playbook.tuner import _default_first

    problems = [RmsNormProblem({"mode": "llama"}, "bf16", [8192, 4096], "cpu"),
                SwigluProblem({"act": "silu"}, "bf16", [8192, 14336], "cpu")]
    for problem in problems:
        space = [(phase, config, "search") for phase, config in problem.candidates()]
        default = problem.default_candidate()
        assert any(p == "bwd" and c != default for p, c, _ in space)
        assert next(c for p, c, _ in space if p == "bwd") != default, "the bug this guards needs a space like this"
        ordered = _default_first(space, default)
        firsts = {}
        for phase, config, _ in ordered:
            firsts.setdefault(phase, config)
        assert firsts == {"fwd": default, "bwd": default}
        for phase in firsts:
            group = [c for p, c, _ in space if p == phase]
            got = [c for p, c, _ in ordered if p == phase]
            expected = group if default in group else [default, *group]
            assert len(got) == len(expected) and all(c in got for c in expected)


def test_rope_candidates_go_nearest_the_default_first():
    """RoPE's space starts each phase at the default and widens from it (one step of heads or warps before two):
    the one- and two-head blocks that came first before never won on an H100, and a one-minute tune of
    4x32x4096x128 ended on the defaults' neighbours (32 heads forward, 16 backward)."""
    import math

    from autokernel.lowering.rope.problem import RopeProblem

    problem = RopeProblem({"kv_heads": 8}, "bf16", [4, 32, 4096, 128], "cpu")
    default = problem.default_candidate()
    for phase in ("fwd", "bwd"):
        steps = [abs(math.log2(c[f"{phase}_block_h"] / default[f"{phase}_block_h"]))
                 + abs(math.log2(c[f"{phase}_num_warps"] / default[f"{phase}_num_warps"]))
                 for p, c in problem.candidates() if p == phase]
        assert steps[0] == 0 and steps == sorted(steps), (phase, steps)
        assert len(steps) > 8  # the whole space is still there, only reordered
