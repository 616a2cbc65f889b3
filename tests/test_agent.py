"""The agent loop against a real HTTP server on 127.0.0.1 that speaks the Messages API (scripted replies)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from messages_server import MessagesServer, message, tool
from models import AGENT_SOURCE

from autokernel.cache import KernelCache
from autokernel.playbook.tuner import TuneRequest, tune

pytest.importorskip("anthropic")

WRONG = AGENT_SOURCE.replace("dx = r * (g - n *", "dx = 1.1 * r * (g - n *")
HANGS = "import time\n" + AGENT_SOURCE.replace("    cols = tl.arange(0, BLOCK_N)\n    mask = cols < n_cols\n    for i",
                                               "    time.sleep(3600)\n    cols = tl.arange(0, BLOCK_N)\n"
                                               "    mask = cols < n_cols\n    for i", 1)
SLOWER = AGENT_SOURCE
FASTER = AGENT_SOURCE.replace("@triton.jit\ndef rms_norm_fwd_kernel", "# variant\n@triton.jit\ndef rms_norm_fwd_kernel")

SCRIPT = [
    (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    message([tool("read_task")]),
    (500, {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}),
    message([{"type": "text", "text": "Reading the best."}, tool("read_best")]),
    message([tool("submit_kernel", source=WRONG)]),
    message([tool("submit_kernel", source=HANGS)]),
    message([tool("submit_kernel", source=SLOWER, config={"fwd_num_warps": 2})]),
    message([tool("submit_kernel", source=FASTER, config={"fwd_num_warps": 1})]),
    message([{"type": "text", "text": "Done."}], stop="end_turn"),
]


@pytest.fixture
def server(monkeypatch):
    srv = MessagesServer(SCRIPT)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key-not-real")
    yield srv
    srv.close()


def _rows(result):
    with open(f"{result.run_dir}/results.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_scripted_agent_session(tmp_path, server):
    cache = KernelCache(tmp_path, device="cpu")
    result = tune(TuneRequest("rms_norm", {"mode": "llama"}, "bf16", [6, 40]), cache, torch.device("cpu"),
                  budget_s=600, timeout_s=20, strategy="agent", max_turns=10)
    rows = _rows(result)
    agent_rows = [r for r in rows if r["phase"] == "agent" and r["n"]]
    assert [r["status"] for r in agent_rows] == ["failed", "crashed", "ok", "ok"], rows
    assert "no answer within" in agent_rows[1]["detail"]
    assert agent_rows[0]["detail"].split(":")[0] in ("shape sweep", "stability", "edge cases")
    done = [r for r in rows if r["phase"] == "agent" and not r["n"]]
    assert done and done[0]["status"] == "done (end_turn)"
    assert "700 input / 140 output tokens, $0.0042 (claude-sonnet-4-5 at $3/$15 per million)" in done[0]["detail"]
    # Every request went to the local server with the key; the failed check came back as a tool result.
    assert all(r["path"] == "/v1/messages" and r["key"] == "test-key-not-real" for r in server.requests)
    verdicts = [json.loads(c["content"]) for r in server.requests for m in r["body"]["messages"]
                if m["role"] == "user" and isinstance(m["content"], list) for c in m["content"]
                if c.get("type") == "tool_result" and c["tool_use_id"].startswith("toolu_submit")]
    assert any(v.get("status") == "failed" for v in verdicts)
    # The cache holds the faster correct source, never the wrong one.
    (entry,) = [e for _, e in cache.entries()]
    ok = sorted(agent_rows[2:], key=lambda r: float(r["train_ms"]))
    expected = SLOWER if json.loads(ok[0]["config"])["fwd_num_warps"] == 2 else FASTER
    assert entry["kernel"]["kind"] == "source" and entry["kernel"]["source"] == expected
    assert entry["producer"]["strategy"] == "agent" and result.status == "written"


def test_agent_without_key_keeps_the_search(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    cache = KernelCache(tmp_path, device="cpu")
    result = tune(TuneRequest("rms_norm", {"mode": "llama"}, "bf16", [6, 40]), cache, torch.device("cpu"),
                  budget_s=600, strategy="both")
    assert result.status == "written"
    rows = _rows(result)
    assert any(r["phase"] == "agent" and r["status"] == "unavailable" and "ANTHROPIC_API_KEY" in r["detail"]
               for r in rows)
    (entry,) = [e for _, e in cache.entries()]
    assert entry["kernel"]["kind"] == "family"


def test_both_leaves_the_agent_its_share_of_the_budget(tmp_path, server, monkeypatch):
    """--strategy both: the search stops at its share of the budget (here none: one candidate a phase, as past
    any budget), and the agent phase still runs in what is left."""
    from autokernel.playbook import tuner

    monkeypatch.setattr(tuner, "SEARCH_BUDGET_SHARE_WITH_AGENT", 0.0)
    cache = KernelCache(tmp_path, device="cpu")
    result = tune(TuneRequest("rms_norm", {"mode": "llama"}, "bf16", [6, 40]), cache, torch.device("cpu"),
                  budget_s=600, timeout_s=20, strategy="both", max_turns=10)
    rows = _rows(result)
    searched = [r for r in rows if r["phase"] in ("fwd", "bwd") and r["n"]]
    assert [r["phase"] for r in searched] == ["fwd", "bwd"], rows
    assert [r["status"] for r in rows if r["phase"] == "agent" and r["n"]] == ["failed", "crashed", "ok", "ok"]
    assert result.status == "written"


@pytest.mark.parametrize(("pattern", "flags", "shape"), [
    ("rms_norm", {"mode": "llama"}, [8, 48]),
    ("layer_norm", {}, [8, 48]),
    ("softmax", {}, [8, 48]),
    ("swiglu", {}, [8, 48]),
    ("cross_entropy", {}, [8, 48]),
    ("linear_cross_entropy", {}, [8, 16, 40]),
    ("rope", {"layout": "half", "kv_heads": 2}, [2, 4, 8, 16]),
])
def test_agent_is_told_every_config_key(pattern, flags, shape):
    """The brief's ``config_keys`` are the default config's keys, all of them: RMSNorm's once left out its
    chunk and split widths, LayerNorm's its forward chunk, so the agent could not ask for them."""
    from autokernel.lowering import families

    problem = families()[pattern].problem(flags, "bf16", shape, "cpu")
    listed = problem.agent_brief()["config_keys"].split(", ")
    assert sorted(listed) == sorted(problem.default_candidate()), listed
