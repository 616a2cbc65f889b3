"""ak-tune's agent loop on the GPU, against a scripted Messages API server on 127.0.0.1: the search's best
RMSNorm kernel against the kernels a scripted agent submits (``<out>/agent.json`` and ``agent.md``).

Usage (device machine; needs the ``agent`` extra, ``anthropic``)::

    python benchmarks/bench_agent.py [--shape 8192x4096] [--budget 1] [--out benchmarks/results] [--smoke]

The device machine cannot reach the Anthropic API, so this shows the loop, not a model's ideas: ``ak-tune
--strategy both`` on RMSNorm (bf16, HF Llama flags) with ``--budget`` minutes searches for half of them, then its
agent phase
talks to a local server (``tests/messages_server.py``) whose script reads the task and the best kernel, submits
``tests/models.py``'s ``AGENT_SOURCE`` (an RMSNorm pair written apart from the built-in family, to the same
kernel contract) under two launch configurations, and ends its turn. Each submission goes through the child
process, the five checks and the timing as a real agent's would; the faster of the search's best and the
submissions is written to the cache. The table shows the search's best, each submission and Inductor (GPU time,
fwd and fwd+bwd), and what the cache kept. ``--smoke`` runs a tiny shape under the Triton interpreter on the CPU:
the plumbing only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

# bench_e2e beside this file, this checkout's autokernel, and the tests' scripted server and agent kernel
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent), str(_HERE.parent / "tests")]
import bench_e2e  # noqa: E402
from messages_server import MessagesServer, message, tool  # noqa: E402
from models import AGENT_SOURCE  # noqa: E402

from autokernel.cache import KernelCache  # noqa: E402
from autokernel.playbook.tuner import TuneRequest, tune  # noqa: E402

REPO = bench_e2e.REPO
FLAGS = {"mode": "llama"}
SUBMITTED_CONFIGS = ({"fwd_num_warps": 8, "bwd_num_warps": 8}, {"fwd_num_warps": 4, "bwd_num_warps": 16})


def script() -> list[tuple[int, dict[str, Any]]]:
    """The scripted agent: read the task and the best kernel, submit AGENT_SOURCE twice, stop."""
    submissions = [message([tool("submit_kernel", source=AGENT_SOURCE, config=cfg)]) for cfg in SUBMITTED_CONFIGS]
    return [message([tool("read_task")]), message([tool("read_best")]), *submissions,
            message([{"type": "text", "text": "Done."}], stop="end_turn")]


def _ms(row: dict[str, str], key: str) -> float | None:
    return float(row[key]) if row.get(key) else None


def run(shape: list[int], budget_min: float, device: Any) -> dict[str, Any]:
    """One ``--strategy both`` tune against the scripted server; the rows of the table and what was cached."""
    server = MessagesServer(script())
    env = {"ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "scripted-not-a-real-key"}
    try:
        with mock.patch.dict(os.environ, env), tempfile.TemporaryDirectory(prefix="bench_agent_") as root:
            cache = KernelCache(root, device=device)
            try:
                result = tune(TuneRequest("rms_norm", FLAGS, "bf16", shape), cache, device,
                              budget_s=budget_min * 60, strategy="both", max_turns=8)
                entries = [e for _, e in cache.entries()]
            finally:
                cache.close()
            with open(Path(result.run_dir) / "results.tsv", newline="") as f:
                logged = list(csv.DictReader(f, delimiter="\t"))
    finally:
        server.close()
    case = "x".join(map(str, shape))
    searched = [r for r in logged if r["phase"] == "bwd" and r["status"] == "ok" and r["train_ms"]]
    submitted = [r for r in logged if r["phase"] == "agent" and r["n"]]
    peer = next((r for r in logged if r["n"] == "0"), {})
    rows = []
    if searched:
        best = min(searched, key=lambda r: float(r["train_ms"]))
        rows.append({"impl": "search best", "status": "ok", "fwd_ms": _ms(best, "fwd_ms"),
                     "train_ms": _ms(best, "train_ms"), "config": best["config"]})
    for i, r in enumerate(submitted, 1):
        rows.append({"impl": f"agent submission {i}", "status": r["status"], "fwd_ms": _ms(r, "fwd_ms"),
                     "train_ms": _ms(r, "train_ms"), "config": r["config"], "detail": r.get("detail", "")})
    rows.append({"impl": "inductor", "status": peer.get("status", ""), "fwd_ms": _ms(peer, "fwd_ms"),
                 "train_ms": _ms(peer, "train_ms"), "config": ""})
    agent_done = next((r for r in logged if r["phase"] == "agent" and not r["n"]), {})
    kernel = entries[0]["kernel"] if entries else {}
    return {"pattern": "rms_norm", "case": case, "dtype": "bf16", "status": result.status,
            "candidates": result.candidates, "seconds": round(result.seconds, 1), "rows": rows,
            "agent": agent_done.get("status", ""), "agent_detail": agent_done.get("detail", ""),
            "requests_to_server": len(server.requests),
            "cached": {"kind": kernel.get("kind"), "producer": entries[0]["producer"]["strategy"] if entries else None,
                       "times": entries[0].get("times") if entries else None}}


def bench_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The result as ``BENCH_FORMAT.md`` rows (one per impl and pass)."""
    out = []
    for r in res["rows"]:
        for pass_name, key in (("fwd", "fwd_ms"), ("fwd+bwd", "train_ms")):
            out.append({"pattern": res["pattern"], "case": res["case"], "dtype": res["dtype"], "pass": pass_name,
                        "impl": r["impl"], "ms": r[key], "peak_mib": None, "status": r["status"]})
    return out


def render_md(meta: dict[str, Any], res: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return f"{v:.4f}" if v is not None else "—"

    lines = [f"# ak-tune's agent loop against a scripted Messages API ({res['pattern']} {res['case']})", "",
             f"- device: {meta['device']}", f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- tune: {res['status']}, {res['candidates']} candidates in {res['seconds']} s; agent phase: "
             f"{res['agent']} ({res['agent_detail']}); {res['requests_to_server']} requests to the local server",
             f"- cached: {res['cached']['kind']} kernel from the {res['cached']['producer']}", "",
             "| impl | status | fwd ms | fwd+bwd ms | config |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['impl']} | {r['status']} | {fmt(r['fwd_ms'])} | {fmt(r['train_ms'])} | "
                     f"`{r['config']}` |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, help="ROWSxHIDDEN (default 8192x4096; --smoke: 64x48)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="minutes for the search and the agent together (default 1; the search gets half)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape under the Triton interpreter (CPU)")
    args = p.parse_args(argv)
    text = args.shape or ("64x48" if args.smoke else "8192x4096")
    try:
        shape = [int(d) for d in text.split("x")]
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--shape looks like ROWSxHIDDEN (e.g. 8192x4096), got {text!r}")
    try:
        import anthropic  # noqa: F401
    except ImportError:
        print("bench_agent needs the agent extra: pip install -e '.[agent]'", file=sys.stderr)
        return 2
    device = bench_e2e.bench_device(args.smoke)
    if device is None:
        return 2
    out = bench_e2e.results_dir(args.out, args.smoke, "bench_agent_out_")
    meta = bench_e2e.run_header(device, ["python", "benchmarks/bench_agent.py"], argv)
    res = run(shape, args.budget, device)
    (out / "agent.json").write_text(json.dumps({**meta, "result": res, "rows": bench_rows(res)}, indent=1) + "\n")
    (out / "agent.md").write_text(render_md(meta, res))
    print(render_md(meta, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
