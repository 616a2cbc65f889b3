"""ak-tune's search rate: candidates per minute, written to ``<out>/tuner.json`` (and ``tuner.md``).

Usage (device machine)::

    python benchmarks/bench_tuner.py [--cases rms_norm:8192x4096,softmax:8192x8192] [--budget 1]
        [--out benchmarks/results] [--exhaust] [--precompile 0,auto] [--smoke]

Each case is tuned by the search (``ak-tune --pattern P --shape S --budget MIN``, bf16) from an empty cache of its
own, and empty Triton and Inductor compile caches: no warm start, no notes, nothing compiled, so every run starts
cold and two runs compare. Per case the row says how many
candidates ran and two rates: over the whole run (Inductor's baseline, every candidate's checks and timing, and the
in-context race at the end) and over the candidate loop alone (the sum of ``results.tsv``'s per-candidate seconds: a
child process checks and times one candidate), and where the loop's time went (compile and first run, the other
checks, timing). ``--exhaust`` turns the tuner's early stops off (a plateau, or a best within 3% of the floor), so
each case runs its whole search space or its budget: the rate is then the loop's throughput, not where the search
chose to stop. ``ms`` is the written entry's time (forward + backward), beside Inductor's. ``--precompile`` lists
the numbers of compiler processes to run each case with (``auto``: ak-tune's default; 0: none), so one call compares
the rate with and without compiling ahead; each row says how many of its candidates had been precompiled when the
worker ran them. ``--smoke`` runs tiny shapes under the Triton interpreter on the CPU: the plumbing only, its rates
mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

# bench_e2e beside this file, and this checkout's autokernel
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import bench_e2e  # noqa: E402

from autokernel.cache import KernelCache  # noqa: E402
from autokernel.playbook import tuner  # noqa: E402
from autokernel.playbook.precompile import compilers  # noqa: E402
from autokernel.playbook.tuner import TuneRequest, tune  # noqa: E402

REPO = bench_e2e.REPO

CASES = "rms_norm:8192x4096,softmax:8192x8192"
SMOKE_CASES = "rms_norm:64x48"


def parse_cases(text: str) -> list[tuple[str, list[int]]]:
    """``pattern:RxH,...`` -> [(pattern, [rows, hidden]), ...]; a clear error names a malformed item."""
    cases = []
    for item in filter(None, text.split(",")):
        pattern, _, shape = item.partition(":")
        try:
            dims = [int(d) for d in shape.split("x")]
        except ValueError:
            dims = []
        if not pattern or len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"--cases items look like pattern:ROWSxHIDDEN (e.g. rms_norm:8192x4096), got {item!r}")
        cases.append((pattern, dims))
    return cases


def candidate_rows(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of ``results.tsv`` that are candidates: numbered from 1. Inductor's baseline is row 0 and the
    in-context race and the resume marker have no number (counting the baseline as a candidate inflated the
    rates of sessions 6 and 7's first runs by one candidate each)."""
    return [r for r in rows if r["n"] and int(r["n"]) >= 1]


def tune_case(pattern: str, shape: list[int], budget_min: float, device: Any, precompile: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_tuner_") as root:
        cache = KernelCache(root, device=device)
        # Cold compiles in every run: Triton's and Inductor's on-disk caches of their own (the worker and the
        # compilers inherit them), so a case run again, with or without compiling ahead, finds nothing compiled.
        compile_caches = {"TRITON_CACHE_DIR": f"{root}/triton", "TORCHINDUCTOR_CACHE_DIR": f"{root}/inductor"}
        try:
            with mock.patch.dict(os.environ, compile_caches):
                result = tune(TuneRequest(pattern, {}, "bf16", shape), cache, device, budget_s=budget_min * 60,
                              precompile=precompile)
        finally:
            cache.close()
        with open(Path(result.run_dir) / "results.tsv", newline="") as f:
            logged = list(csv.DictReader(f, delimiter="\t"))
    rows = candidate_rows(logged)
    baseline = next((r for r in logged if r["n"] == "0"), {})
    loop_s = sum(float(r["seconds"]) for r in rows if r["seconds"])
    return {
        "pattern": pattern, "case": "x".join(map(str, shape)), "dtype": "bf16", "pass": "fwd+bwd",
        "impl": "autokernel", "precompile": precompile,
        # Candidates by whether their kernels were compiled ahead when the worker ran them (done, pending, failed;
        # "no" without a precompiler).
        "precompiled": {s or "no": sum(r.get("precompiled", "") == s for r in rows)
                        for s in sorted({r.get("precompiled", "") for r in rows})},
        "ms": result.times.get("train_ms"), "inductor_ms": result.times.get("inductor_train_ms"),
        "status": result.status, "candidates": result.candidates, "run_s": round(result.seconds, 1),
        "candidates_per_min": round(60 * result.candidates / result.seconds, 1) if result.seconds else None,
        "loop_s": round(loop_s, 1),
        "loop_candidates_per_min": round(60 * len(rows) / loop_s, 1) if loop_s else None,
        "by_status": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        # Where the passing candidates' worker time went (compile + first run, other checks, timing), in seconds:
        # what a faster search has to cut.
        "loop_split_s": {part: round(sum(float(r.get(f"{part}_s") or 0) for r in rows), 2)
                         for part in ("smoke", "checks", "timing")},
        # Inductor's baseline, the largest cost outside the loop: its compiles (with first runs), its timing.
        "inductor_split_s": {part: round(float(baseline.get(f"{part}_s") or 0), 2) for part in ("smoke", "timing")},
    }


def render_md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["# ak-tune search rate", "", f"- device: {meta['device']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- early stops (plateau, near the floor): {'on' if meta.get('early_stops', True) else 'off (--exhaust)'}",
             "", "| pattern, shape | compilers | precompiled | status | candidates | run s | per min (run) | "
             "per min (candidate loop) | "
             "ms fwd+bwd | Inductor ms | by status | loop s: compile+smoke / checks / timing | "
             "Inductor s: compile+first run / timing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if r["ms"] is not None else "—"
        ind = f"{r['inductor_ms']:.4f}" if r["inductor_ms"] is not None else "—"
        precompiled = ", ".join(f"{state} {n}" for state, n in r.get("precompiled", {}).items())
        lines.append(f"| {r['pattern']} {r['case']} | {r.get('precompile', '')} | {precompiled} | "
                     f"{r['status']} | {r['candidates']} | {r['run_s']} | "
                     f"{r['candidates_per_min']} | {r['loop_candidates_per_min']} | {ms} | {ind} | {r['by_status']} | "
                     + " / ".join(str(v) for v in r["loop_split_s"].values()) + " | "
                     + " / ".join(str(v) for v in r.get("inductor_split_s", {}).values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None, help=f"comma list of pattern:ROWSxHIDDEN (default {CASES})")
    p.add_argument("--budget", type=float, default=1.0, help="minutes of tuning per case (default 1)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    p.add_argument("--exhaust", action="store_true",
                   help="no early stop (plateau, within 3%% of the floor): each case runs its whole search space or "
                        "budget, so the rate is the loop's throughput, not where the search chose to stop")
    p.add_argument("--precompile", default="0,auto",
                   help="comma list of compiler-process counts, each case run once with each (auto: ak-tune's "
                        "default; default 0,auto)")
    args = p.parse_args(argv)
    try:
        counts = [compilers() if c == "auto" else int(c) for c in args.precompile.split(",")]
    except ValueError:
        p.error(f"--precompile is a comma list of counts or auto, got {args.precompile!r}")
    try:
        cases = parse_cases(args.cases or (SMOKE_CASES if args.smoke else CASES))
    except ValueError as exc:
        p.error(str(exc))
    device = bench_e2e.bench_device(args.smoke)
    if device is None:
        return 2
    out = bench_e2e.results_dir(args.out, args.smoke, "bench_tuner_out_")
    meta = bench_e2e.run_header(device, ["python", "benchmarks/bench_tuner.py"], argv)
    meta["early_stops"] = not args.exhaust
    if args.exhaust:
        # The tuner reads these per candidate. Softmax 8192x8192 on the H100 stopped after 4 candidates (its best
        # within 3% of the floor, by arithmetic): a run that stops early measures the floor, not the rate.
        tuner.PLATEAU, tuner.NEAR_FLOOR = sys.maxsize, 0.0
    rows = []
    for (pattern, shape), count in itertools.product(cases, counts):
        rows.append(tune_case(pattern, shape, args.budget, device, count))
        print(json.dumps(rows[-1]), flush=True)
        # Saved after every case: a run stopped at a time limit keeps what it measured.
        (out / "tuner.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / "tuner.md").write_text(render_md(meta, rows))
    print(render_md(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
