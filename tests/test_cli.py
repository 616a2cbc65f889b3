"""ak-cache, and AUTOKERNEL_LOG: what a user sees outside Python."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from autokernel.cache import KernelCache, row_bucket
from autokernel.cache import cli as cache_cli
from autokernel.lowering.rms_norm.ops import pattern_key


def _entry(hidden: int, rows: int):
    import torch

    return {
        "version": 1, "pattern": "rms_norm", "pattern_key": pattern_key("llama", 0.0, torch.bfloat16,
                                                                         torch.bfloat16, torch.bfloat16),
        "hidden": hidden, "row_bucket": row_bucket(rows), "kernel": {"kind": "family", "config": {}},
        "winner": {"fwd": "inductor", "train": "autokernel"}, "producer": {"strategy": "test"},
        "checks": [], "created": time.time(), "times": {"fwd_ms": 1.5, "inductor_fwd_ms": 1.0},
    }


def test_ak_cache_list_wanted_clear(tmp_path, capsys):
    cache = KernelCache(tmp_path, device="cpu")
    cache.put_entry(_entry(64, 32))
    cache.db.set("entry/rms_norm/bogus/H=1/R=1", {"version": 1})
    cache.record_wanted("rms_norm", "rms_norm/k", {"mode": "llama"}, "bf16", [4, 8, 64], 64, 32)
    cache.record_wanted("rms_norm", "rms_norm/k", {"mode": "llama"}, "bf16", [4, 8, 64], 64, 32)
    assert cache_cli.main(["--cache-dir", str(tmp_path), "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cache.path)
    assert cache_cli.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "H=64/R=32  winner fwd=inductor train=autokernel" in out and "fwd 1.5000 ms (Inductor 1.0000)" in out
    assert "bogus/H=1/R=1  UNUSABLE: entry lacks 'pattern'" in out
    assert cache_cli.main(["--cache-dir", str(tmp_path), "wanted"]) == 0
    assert "shape 4x8x64  seen 2x" in capsys.readouterr().out
    assert cache_cli.main(["--cache-dir", str(tmp_path), "clear", "--yes"]) == 0
    assert list(cache.entries()) == [] and cache.wanted() == []


def test_autokernel_log_reports_instances_at_compile_time(tmp_path):
    code = (
        "import torch, autokernel\n"
        "def f(x, w):\n"
        "    h = x.float(); h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)\n"
        "    return w * h.to(x.dtype)\n"
        "torch.compile(f, backend='autokernel', options={'autokernel.compiler': 'aot_eager'})"
        "(torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16))\n"
    )
    env = dict(os.environ, AUTOKERNEL_LOG="info", AUTOKERNEL_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    script = tmp_path / "train.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[autokernel INFO] autokernel: rms_norm miss bf16 4x32 at train.py:4 in f: return w * h.to(x.dtype)" \
        in result.stderr


def test_ak_cache_ls_json_show_rm(tmp_path, capsys):
    import json

    cache = KernelCache(tmp_path, device="cpu")
    cache.put_entry(_entry(64, 32))
    cache.put_entry(_entry(128, 32))
    assert cache_cli.main(["--cache-dir", str(tmp_path), "ls", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["hidden"] for r in rows) == [64, 128] and all(r["usable"] for r in rows)
    key = rows[0]["key"]
    assert cache_cli.main(["--cache-dir", str(tmp_path), "show", key]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == {"kind": "family", "config": {}}
    assert cache_cli.main(["--cache-dir", str(tmp_path), "show", "entry/nope"]) == 1
    assert cache_cli.main(["--cache-dir", str(tmp_path), "rm", key]) == 0
    assert len(list(cache.entries())) == 1
    assert cache_cli.main(["--cache-dir", str(tmp_path), "rm", "--pattern", "rms_norm"]) == 0
    assert list(cache.entries()) == []
    assert cache_cli.main(["--cache-dir", str(tmp_path), "rm", "--pattern", "rms_norm"]) == 1


def test_ak_cache_prune(tmp_path, capsys):
    cache = KernelCache(tmp_path, device="cpu")
    old = _entry(64, 32)
    old["created"] = time.time() - 10 * 86400
    loser = _entry(128, 32)
    loser["winner"] = {"fwd": "inductor", "train": "inductor"}
    fresh = _entry(256, 32)
    for e in (old, loser, fresh):
        cache.put_entry(e)
    stale_fp = cache.fingerprint.split("-torch")[0] + "-torch1.0.0-triton1.0.0"
    KernelCache(tmp_path, fingerprint_=stale_fp).put_entry(_entry(64, 32))
    other_gpu = KernelCache(tmp_path, fingerprint_="NVIDIA_H100-sm132-cc90-torch2.11.0-triton3.6.0")
    other_gpu.put_entry(_entry(64, 32))
    assert cache_cli.main(["--cache-dir", str(tmp_path), "prune", "--older-than", "7"]) == 0
    out = capsys.readouterr().out
    assert "another torch/triton version" in out and "Inductor wins both passes" in out and "older than 7 days" in out
    assert [e["hidden"] for _, e in cache.entries()] == [256]
    assert not (tmp_path / stale_fp).exists() and (tmp_path / other_gpu.fingerprint).exists()


def test_ak_tune_summary_of_nothing_is_the_header():
    """A run whose budget ends before any shape (or whose every shape failed early) still prints a table."""
    from autokernel.playbook.cli import _summary
    from autokernel.playbook.tuner import TuneRequest

    assert _summary([]).split()[:3] == ["pattern", "shape", "dtype"]
    assert TuneRequest("softmax", {}, "bf16", [4, 8]).label() == "softmax 4x8 bf16"


def test_ak_tune_summary_says_which_passes_are_ours():
    """A written entry whose training pass lost to Inductor serves the forward only: the table says so, beside
    times that alone would suggest otherwise."""
    from autokernel.playbook.cli import _summary
    from autokernel.playbook.tuner import TuneRequest, TuneResult

    request = TuneRequest("rms_norm", {}, "bf16", [8, 16])
    forward_only = TuneResult(request, "written", served=("fwd",), times={"fwd_ms": 0.02, "train_ms": 0.09})
    lost = TuneResult(request, "inductor wins")
    # Faster alone (0.06 vs 0.15) but slower served through torch.compile: the in-context column shows why.
    lost_in_context = TuneResult(request, "inductor wins", times={
        "train_ms": 0.06, "inductor_train_ms": 0.15, "in_context_train_ms": 0.21, "in_context_inductor_train_ms": 0.18,
        "in_context_clock": "gpu"})
    no_context_time = TuneResult(request, "inductor wins", times={"train_ms": 0.06, "in_context_train_ms": None,
                                                                   "in_context_clock": None})
    # Linear + CE served 4% slower than Inductor in context, at under half its peak memory: both peaks shown.
    within_slack = TuneResult(request, "written", served=("fwd", "train"), times={
        "train_ms": 40.1, "in_context_train_ms": 40.76, "in_context_inductor_train_ms": 38.91,
        "in_context_train_peak_mib": 1316.4, "in_context_inductor_train_peak_mib": 3070.0, "in_context_clock": "gpu"})
    header, first, second, third, fourth, fifth = _summary(
        [forward_only, lost, lost_in_context, no_context_time, within_slack]).splitlines()
    assert header.split()[3:5] == ["status", "ours"] and header.split()[13:15] == ["in", "context"]
    assert first.split()[3:6] == ["written", "fwd", "0.0200"] and first.split()[9] == "-"
    assert second.split()[3:5] == ["inductor", "wins"] and second.split()[5] == "-"
    assert third.split()[7:11] == ["0.0600", "-", "0.1500", "0.2100/0.1800"]
    assert fourth.split()[10] == "failed"
    assert "40.7600/38.9100 (1316/3070 MiB)" in fifth and "MiB" not in third


def test_agent_cost_from_the_price_table_or_the_override(capsys):
    """ak-tune logs the agent's tokens with their cost: the list price of the model (an id with a date suffix
    matches its family), the --agent-price override, or 'unknown' saying how to give one."""
    import pytest

    from autokernel.playbook import cli
    from autokernel.playbook.agent import AgentRun, price_for

    run = AgentRun(input_tokens=700, output_tokens=140)
    assert price_for("claude-sonnet-4-5-20250929") == (3.0, 15.0) and price_for("claude-opus-4-5") == (5.0, 25.0)
    assert run.usage("claude-sonnet-4-5") == ("700 input / 140 output tokens, $0.0042 "
                                              "(claude-sonnet-4-5 at $3/$15 per million)")
    assert run.usage("claude-sonnet-4-5", (1.0, 2.0)).endswith("$0.0010 (claude-sonnet-4-5 at $1/$2 per million)")
    assert "cost unknown for some-model (give ak-tune --agent-price IN,OUT" in run.usage("some-model")
    with pytest.raises(SystemExit):
        cli.main(["--pattern", "rms_norm", "--shape", "4x32", "--agent-price", "3"])
    assert "--agent-price looks like IN,OUT" in capsys.readouterr().err
