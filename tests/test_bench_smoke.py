"""The benchmark scripts' plumbing, end to end on the CPU: ``bench_patterns.py``, ``bench_ddp.py`` (two gloo
ranks), ``bench_inference.py`` and ``bench_tuner.py``, each with ``--smoke``; ``op_host_cost.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_patterns.py"
REQUIRED_TOP = ("device", "torch", "triton", "date", "command", "copy_gbps", "rows")
REQUIRED_ROW = ("pattern", "case", "dtype", "pass", "impl", "ms", "peak_mib")


def test_bench_smoke_rms_norm(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["AUTOKERNEL_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--patterns", "rms_norm"]
    cmd += ["--impls", "eager,autokernel", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / "rms_norm.json").read_text())
    assert (out / "rms_norm.md").is_file()
    for key in REQUIRED_TOP:
        assert key in data, key
    assert data["copy_gbps"] > 0
    rows = data["rows"]
    for row in rows:
        for key in REQUIRED_ROW:
            assert key in row, (key, row)
        assert row["pattern"] == "rms_norm" and row["dtype"] == "bf16"

    for pass_ in ("fwd", "fwd+bwd"):
        by_impl = {r["impl"]: r for r in rows if r["pass"] == pass_}
        assert set(by_impl) == {"eager", "autokernel", "floor"}, (pass_, sorted(by_impl))
        assert by_impl["floor"]["ms"] > 0
        for impl in ("eager", "autokernel"):
            row = by_impl[impl]
            assert "error" not in row, (pass_, impl, row.get("error"))
            assert row["ms"] is not None and row["ms"] > 0, (pass_, impl)
            assert row["ok"] is True, (pass_, impl, row.get("max_rel_err"))
            assert row["floor_pct"] is not None
        assert by_impl["autokernel"]["cache"] in ("hit", "miss")
        if by_impl["autokernel"]["cache"] == "miss":
            assert by_impl["autokernel"].get("reason")


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_bench_ddp_smoke(tmp_path: Path, wrap: str) -> None:
    """``torchrun --nproc-per-node 2 bench_ddp.py --smoke``: two gloo ranks on the CPU, rank 0 writes the rows."""
    out = tmp_path / "results"
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOKERNEL_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "benchmarks" / "bench_ddp.py"), "--smoke", "--wrap", wrap, "--impls", "eager,autokernel",
           "--iters", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / f"llama-step-{wrap}.json").read_text())
    assert (out / f"llama-step-{wrap}.md").is_file()
    for key in REQUIRED_TOP:
        if key != "copy_gbps":  # whole-model benchmarks do not measure the copy bandwidth
            assert key in data, key
    assert data["world_size"] == 2 and data["command"].startswith("torchrun --nproc-per-node 2 ")
    rows = {row["impl"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "autokernel"}
    for row in rows.values():
        for key in REQUIRED_ROW:
            assert key in row, (key, row)
        assert "error" not in row, row["error"]
        assert row["pattern"] == f"llama-step-{wrap}" and row["world_size"] == 2 and row["ms"] > 0
        assert len(row["ms_per_rank"]) == 2 and row["first_step_s"] > 0
    assert abs(rows["autokernel"]["loss"] - rows["eager"]["loss"]) < 1e-3
    instances = rows["autokernel"]["instances"]  # the cache is empty: every instance found was a miss
    assert instances and all(key.endswith(":miss") for key in instances), instances


def test_bench_inference_smoke(tmp_path: Path) -> None:
    """``bench_inference.py --smoke``: decode, prefill and the decode-shape kernels on the CPU, in the results
    format; the CUDA-graph impl is skipped with its reason, and no impl recompiles."""
    out = tmp_path / "results"
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOKERNEL_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--smoke", "--out", str(out),
           "--kernel-impls", "eager,autokernel"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name, cases in (("llama-decode", {"b1", "b2"}), ("llama-prefill", {"b2-s16"})):
        data = json.loads((out / f"{name}.json").read_text())
        assert (out / f"{name}.md").is_file()
        assert all(key in data for key in REQUIRED_TOP if key != "copy_gbps"), sorted(data)
        rows = data["rows"]
        assert {r["case"] for r in rows} == cases
        for row in rows:
            assert all(key in row for key in REQUIRED_ROW), row
            assert row["pattern"] == name and row["pass"] == "fwd", row
            assert "error" not in row, row
            if row["impl"] == "inductor-reduce-overhead":
                assert row["ms"] is None and "CUDA graphs" in row["skipped"], row
                continue
            assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["recompiles"] == 0, row
        ours = [r for r in rows if r["impl"] == "autokernel"]
        assert ours and all(r["graphs"] == 1 and sum(r["instances"].values()) >= 3 for r in ours), ours

    kernels = json.loads((out / "decode-kernels.json").read_text())["rows"]
    assert {r["pattern"] for r in kernels} == {"rms_norm", "add_rms_norm", "rope", "swiglu"}
    for row in kernels:
        assert "error" not in row, row
        assert row["us"] > 0 and row["pass"] == "fwd", row
        if row["impl"] == "autokernel":
            assert row["ok"] is True and row["cache"] in ("hit", "miss"), row


def test_bench_tuner_smoke(tmp_path: Path) -> None:
    """``bench_tuner.py --smoke``: one case tuned from an empty cache, its rates written in the results format."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_tuner.py"), "--smoke", "--cases", "rms_norm:4x16",
           "--budget", "0.01", "--exhaust", "--precompile", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "tuner.json").read_text())
    (row,) = data["rows"]
    assert data["early_stops"] is False
    assert "early stops (plateau, near the floor): off" in (out / "tuner.md").read_text()
    assert (row["pattern"], row["case"], row["status"], row["precompile"]) == ("rms_norm", "4x16", "written", 0)
    assert row["candidates"] >= 1 and row["candidates_per_min"] > 0 and row["loop_candidates_per_min"] > 0
    assert sum(row["by_status"].values()) == row["candidates"]
    split = row["loop_split_s"]  # the worker's own clock: inside the tuner's per-candidate seconds
    assert set(split) == {"smoke", "checks", "timing"} and min(split.values()) > 0, split
    assert sum(split.values()) <= row["loop_s"] + 0.05 * row["candidates"] + 0.05, (split, row["loop_s"])  # rounding
    assert row["precompiled"] == {"no": row["candidates"]}, row  # no compiler processes off CUDA
    assert f"| rms_norm 4x16 | 0 | no {row['candidates']} | written |" in (out / "tuner.md").read_text()
    bad = subprocess.run([*cmd[:2], "--smoke", "--cases", "rms_norm:8192"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "pattern:ROWSxHIDDEN" in bad.stderr and "'rms_norm:8192'" in bad.stderr


def test_bench_agent_smoke(tmp_path: Path) -> None:
    """``bench_agent.py --smoke``: the search, then the agent phase against the scripted local server (two
    submissions of an independently written kernel), the table and the results format."""
    pytest.importorskip("anthropic")
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_agent.py"), "--smoke", "--shape", "6x40", "--budget", "5",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "agent.json").read_text())
    res = data["result"]
    assert [r["impl"] for r in res["rows"]] == ["search best", "agent submission 1", "agent submission 2", "inductor"]
    assert [r["status"] for r in res["rows"][:3]] == ["ok", "ok", "ok"], res["rows"]
    assert res["agent"] == "done (end_turn)" and res["requests_to_server"] == 5
    assert res["status"] == "written" and res["cached"]["producer"] in ("search", "agent")
    for row in data["rows"]:
        for key in REQUIRED_ROW:
            assert key in row, (key, row)
    assert "| agent submission 2 | ok |" in (out / "agent.md").read_text()
    bad = subprocess.run([*cmd[:2], "--smoke", "--shape", "8192"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "ROWSxHIDDEN" in bad.stderr and "'8192'" in bad.stderr


def test_bench_tuner_counts_only_candidates() -> None:
    """Inductor's baseline (row 0 on a GPU), the in-context race and a resume marker (no number) are not candidates:
    counting the baseline inflated the per-minute rates."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_tuner

    rows = [{"n": "0", "status": "inductor ok"}, {"n": "1", "status": "ok"}, {"n": "2", "status": "failed"},
            {"n": "", "status": "ok"}, {"n": "", "status": "resumed"}]
    assert [r["n"] for r in bench_tuner.candidate_rows(rows)] == ["1", "2"]


def test_bench_patterns_cut_cross_entropy_only_for_linear_ce() -> None:
    """Cut Cross-Entropy is a peer of linear + CE alone: other patterns get no row for it, and the table has
    its columns."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_patterns

    asked = ["eager", "inductor", "cce", "cce-compile", "autokernel"]
    assert bench_patterns.impls_for(bench_patterns.PATTERNS["linear_cross_entropy"], asked) == asked
    assert bench_patterns.impls_for(bench_patterns.PATTERNS["softmax"], asked) == ["eager", "inductor", "autokernel"]
    assert bench_patterns.parse_args(["--patterns", "linear_cross_entropy", "--impls", "cce"]).impl_list == ["cce"]
    row = {"pattern": "linear_cross_entropy", "case": "16x32->64", "pass": "fwd", "ms": 2.0, "ok": True}
    ak = {**row, "impl": "autokernel", "ms": 1.0, "cache": "hit", "floor_pct": 50.0}
    md = bench_patterns.render_md({"device": "d", "torch": "t", "triton": "tr", "date": "x", "command": "c",
                                   "copy_gbps": 1.0}, [{**row, "impl": "cce"}, ak])
    assert "| cce | cce compile |" in md and "2.00x (cce)" in md


def test_bench_e2e_memory_blocks_alive_at_the_peak() -> None:
    """``bench_e2e --memory``: the allocator trace replayed to the moment the step held the most; blocks freed
    before it, or allocated after it, are not in the answer; an address reused counts once per life."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_e2e

    mib = 2**20
    events = [{"action": "alloc", "addr": 1, "size": 32 * mib}, {"action": "alloc", "addr": 2, "size": 128 * mib},
              {"action": "free_requested", "addr": 2, "size": 128 * mib},
              {"action": "free_completed", "addr": 2, "size": 128 * mib},
              {"action": "alloc", "addr": 2, "size": 32 * mib}, {"action": "alloc", "addr": 3, "size": 501 * mib},
              {"action": "alloc", "addr": 4, "size": 32 * mib},  # the peak: 32 x 3 + 501
              {"action": "free_completed", "addr": 3, "size": 501 * mib},
              {"action": "alloc", "addr": 5, "size": 64 * mib}]
    peak, blocks = bench_e2e.live_at_peak(events)
    assert peak == (3 * 32 + 501) * mib
    assert blocks == [(501 * mib, 1), (32 * mib, 3)]
    row = {"impl": "autokernel", "ms": 1.0, "tokens_per_s": 1, "peak_mib": 597.0, "first_step_s": 1.0, "loss": 1.0,
           "peak_blocks": {"traced_peak_mib": 597.0, "by_size": [[501.0, 1], [32.0, 3]]}}
    md = bench_e2e.render_md({"case": "c", "device": "d", "torch": "t", "triton": "t", "date": "d", "command": "c"},
                             [row])
    assert "- autokernel: 597.0 MiB at the peak: 501 x 1, 32 x 3" in md


def test_bench_e2e_profile_sorts_kernels_by_name() -> None:
    """``bench_e2e --profile``: cuBLAS, flash-attention, autokernel's and Inductor's kernels are told apart by name
    (first match wins: an Inductor kernel that names a pattern is still Inductor's), and the table shows them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_e2e

    expected = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
                "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "matmul",
                "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
                "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
                "_rms_norm_bwd_single_kernel_0": "autokernel", "_linear_cross_entropy_chunk": "autokernel",
                "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "inductor",
                "triton_per_fused_rms_norm_1": "inductor",
                "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other"}
    assert {name: bench_e2e.kernel_category(name) for name in expected} == expected
    row = {"impl": "inductor", "ms": 2.0, "tokens_per_s": 1, "peak_mib": 1.0, "first_step_s": 1.0, "loss": 1.0,
           "kernels": {"total_ms": 1.5, "by_category": {"matmul": 1.0, "inductor": 0.5},
                       "top": [["sm90_xmma_gemm", "matmul", 3, 1.0]]}}
    md = bench_e2e.render_md({"case": "c", "device": "d", "torch": "t", "triton": "t", "date": "d", "command": "c"},
                             [row])
    assert "- inductor: kernels 1.50 of 2.00: matmul 1.00, inductor 0.50" in md
    assert "| `sm90_xmma_gemm` | matmul | 3 | 1.000 |" in md


def test_bench_e2e_profile_lists_every_kernel_in_the_json() -> None:
    """``bench_e2e --profile``: the table's top kernels, and in the JSON every kernel by name, longest first, with
    its calls (so that a category's time, Inductor's in autokernel's step, can be traced to its kernels)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_e2e

    names = [f"triton_poi_fused_{i}" for i in range(bench_e2e.PROFILE_TOP + 3)]
    spans = [(10.0 * i, 10.0 * i + 0.1 * (i + 1), name) for i, name in enumerate(names)]
    spans.append((500.0, 500.05, names[0]))  # a second call of the first
    summary = bench_e2e.span_summary(spans)
    assert len(summary["top"]) == bench_e2e.PROFILE_TOP
    assert [n for n, *_ in summary["by_name"]] == names[::-1]
    assert summary["by_name"][-1] == [names[0], "inductor", 2, 0.15]
    assert summary["by_category"] == {"inductor": round(sum(e - s for s, e, _ in spans), 3)}


def test_bench_e2e_profile_finds_where_the_gpu_waited() -> None:
    """``bench_e2e --profile``: idle time is counted between kernels only (overlapping kernels, on two streams, leave
    no gap), and the longest waits name the kernel before and after."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_e2e

    spans = [(0.0, 1.0, "a"), (0.5, 2.0, "b"), (1.2, 1.5, "c"),  # b overlaps a and covers c: busy until 2.0
             (2.5, 3.0, "d"),  # 0.5 idle after b
             (3.01, 4.0, "e"),  # 0.01 idle: counted, but under the gap report's threshold
             (5.0, 6.0, "f")]  # 1.0 idle after e
    idle, gaps = bench_e2e.idle_gaps(spans)
    assert abs(idle - 1.51) < 1e-9
    assert gaps == [(1.0, "e", "f"), (0.5, "b", "d")]
    row = {"impl": "autokernel", "ms": 7.0, "tokens_per_s": 1, "peak_mib": 1.0, "first_step_s": 1.0, "loss": 1.0,
           "kernels": {"total_ms": 5.0, "by_category": {"matmul": 5.0}, "top": [], "idle_between_kernels_ms": 1.51,
                       "gaps": [[1.0, "e", "f"]]}}
    md = bench_e2e.render_md({"case": "c", "device": "d", "torch": "t", "triton": "t", "date": "d", "command": "c"},
                             [row])
    assert "- autokernel: kernels 5.00 of 7.00: matmul 5.00; idle between kernels 1.51\n" in md
    # The markers either side of the step: the GPU waited 0.4 ms for its first kernel and 0.25 after its last
    # (the kernel on a second stream that ends last, not the last to start, closes the step).
    bracketed = [(0.0, 0.1, "marker"), (0.5, 1.0, "a"), (0.9, 2.0, "b"), (1.5, 1.75, "c"), (2.25, 2.3, "marker")]
    assert bench_e2e.edge_waits(bracketed) == {"wait_before_first_kernel_ms": 0.4, "wait_after_last_kernel_ms": 0.25}
    with pytest.raises(ValueError, match="got 2 spans"):
        bench_e2e.edge_waits(bracketed[:2])
    row["kernels"].update(wait_before_first_kernel_ms=0.4, wait_after_last_kernel_ms=0.25)
    md = bench_e2e.render_md({"case": "c", "device": "d", "torch": "t", "triton": "t", "date": "d", "command": "c"},
                             [row])
    assert "idle between kernels 1.51; before the first 0.40; after the last 0.25" in md
    assert "| 1.000 | `e` | `f` |" in md


def test_op_host_cost_runs(tmp_path: Path) -> None:
    """``op_host_cost.py``: every row timed (a positive number), the stubbed wrapper never launching a kernel."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "op_host_cost.py"), "--calls", "50"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict(line.strip("|").split("|")[:2] for line in proc.stdout.splitlines()[3:])
    assert {k.strip() for k in rows} == {"op", "ours", "custom_op no-op", "Library no-op", "empty_like"}, proc.stdout
    assert all(float(v) > 0 for v in rows.values()), proc.stdout


def test_sweep_norm_runs_every_backward_kernel() -> None:
    """``sweep_norm.py`` off CUDA: every backward kernel named (single, chunked, RMSNorm's split) and every forward
    chunk width runs; a kernel the family does not have is refused by name."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sweep_norm

    rows = sweep_norm.sweep("rms_norm", 5, 300, ("fwd", "bwd"), torch.device("cpu"), warps=(1,), per_sm_grid=(2,),
                            rpp_grid=(1,), bwd_kernels=["single", "chunk:64", "split:128"], with_inductor=False)
    assert [r["config"] for r in rows if r["pass"] == "bwd"] == [
        "single warps  1 x  2/SM", "chunk:64 warps  1 x  2/SM", "split:128 warps  1 x  2/SM"]
    assert all(r["clock"] == "ran" for r in rows)
    assert sweep_norm.default_bwd_kernels("rms_norm", 32768)[0] == "split:512"
    assert sweep_norm.default_bwd_kernels("layer_norm", 32768) == ["chunk:2048", "chunk:4096", "chunk:8192"]
    from autokernel.lowering.layer_norm.kernels import LayerNormConfig

    n, p, w = LayerNormConfig().sum_tile
    tiles = sweep_norm.sweep("layer_norm", 9, 37, ("bwd",), torch.device("cpu"), warps=(1,), per_sm_grid=(2,),
                             with_inductor=False, sum_tiles=((8, 4, 1), (n, p, w)))
    assert [(r["config"], r["default"]) for r in tiles if r["config"].startswith("default")] == [
        ("default, sum tile 8x4 warps 1", False), (f"default, sum tile {n}x{p} warps {w}", True)]
    with pytest.raises(ValueError, match="split:64"):
        sweep_norm.sweep("layer_norm", 5, 300, ("bwd",), torch.device("cpu"), warps=(1,), per_sm_grid=(1,),
                         bwd_kernels=["split:64"], with_inductor=False)


def test_bench_patterns_each_impl_sees_static_inputs() -> None:
    """A graph compiled with ``dynamic=True`` (Cut Cross-Entropy's) marks the tensors it saves for backward as
    dynamic for later compiles, across ``torch._dynamo.reset()``; the benchmark clears that before each impl, or
    the autokernel row after CCE's traces a symbolic vocabulary and declines."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_patterns

    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    torch.compile(lambda a, b: (a @ b.t()).logsumexp(-1).sum(), dynamic=True)(h, w).backward()
    bench_patterns.reset_dynamo()
    seen: list[list[object]] = []

    def shapes(gm: torch.fx.GraphModule, example_inputs: list[object]):
        # the traced sizes (the example inputs handed to a backend are the real tensors)
        traced = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
        seen.append([s for t in traced if isinstance(t, torch.Tensor) for s in t.shape])
        return gm.forward

    def later(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.t()

    torch.compile(later, backend=shapes)(h, w)
    assert any(isinstance(s, torch.SymInt) for s in seen[-1])  # the mark is real, so the test below can fail
    bench_patterns.reset_dynamo()
    bench_patterns.forget_dynamic_marks([[h, w]])
    torch.compile(later, backend=shapes)(h, w)
    assert all(type(s) is int for s in seen[-1]) and sorted(seen[-1]) == [4, 4, 6, 10]
    bench_patterns.reset_dynamo()
