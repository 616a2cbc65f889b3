"""One training step of a Llama-style decoder: eager, Inductor, Inductor max-autotune, Liger, autokernel.

Usage (device machine)::

    python benchmarks/bench_e2e.py [--impls eager,inductor,liger,autokernel] [--tune MIN]
        [--cache-dir DIR] [--out benchmarks/results] [--iters 10] [--memory] [--smoke]

The model is the one of ``../shared/probes/e2e.py``: ``transformers.LlamaConfig`` with hidden 2048,
4 layers, 16 heads / 8 kv heads, intermediate 8192, vocab 128256, untied lm_head, SDPA attention, bf16
random weights; batch 2 x seq 4096 tokens, forward with labels then backward (no optimizer). Each impl
is timed on a fresh copy of the same weights: the first step (compile included, with Inductor's FX-graph
and AOTAutograd caches off, so every impl compiles cold), two warm-up steps, then the median of
``--iters`` steps between CUDA events, and the peak memory above the weights (``--memory``: and which blocks are
alive at that peak, by size, from one more step with the allocator's trace on).

``--tune MIN`` first runs ``ak-tune --model benchmarks/bench_e2e.py:factory --budget MIN`` (the same
model, through the public CLI) and reports its wall time: the time to fill the cache for this model.
The autokernel row then also says how many pattern instances hit the cache (``autokernel.explain``).

Writes ``<out>/llama-step.json`` (``BENCH_FORMAT.md``: pattern ``llama-step``, case
``h2048-l4-v128256-t8192``) and ``<out>/llama-step.md``. ``--smoke`` runs a tiny config on the CPU
(Triton interpreter) to test the plumbing; its times mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch._inductor.config

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("eager", "inductor", "inductor-max-autotune", "liger", "autokernel")
DEFAULT_IMPLS = "eager,inductor,liger,autokernel"
FULL = dict(hidden=2048, layers=4, heads=16, kv_heads=8, intermediate=8192, vocab=128256, batch=2, seq=4096)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=2, seq=16)
MEMORY_ROWS = 15  # --memory: the block sizes reported per impl
PROFILE_TOP = 12  # --profile: the longest kernels reported per impl
PROFILE_GAPS = 8  # --profile: the longest stretches without GPU work between kernels, per impl
# --profile: a kernel's category by its name, first match wins (flash/efficient/cuDNN attention, cuBLAS/CUTLASS
# matmuls, autokernel's Triton kernels, Inductor's generated ones; the rest is ATen's own kernels).
# Attention first: cuDNN's SDPA kernels carry matmul-like names (cudnn_generated_fort_native_sdpa_sm90_flash_...).
KERNEL_CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_", re.I)),
    ("autokernel", re.compile(r"^_(rms_norm|layer_norm|softmax|rope|swiglu|cross_entropy|linear_cross_entropy)")),
    ("inductor", re.compile(r"^triton_")),
)
CONFIG_ENV = "AK_BENCH_E2E_CONFIG"  # how the model's dimensions reach factory() in ak-tune's process


def case_name(dims: dict[str, int]) -> str:
    return f"h{dims['hidden']}-l{dims['layers']}-v{dims['vocab']}-t{dims['batch'] * dims['seq']}"


def build(dims: dict[str, int], device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                      num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                      num_key_value_heads=dims["kv_heads"], vocab_size=dims["vocab"],
                      max_position_embeddings=max(8192, dims["seq"]), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device, dtype)
    ids = torch.randint(0, dims["vocab"], (dims["batch"], dims["seq"]), device=device)
    return model, {"input_ids": ids, "labels": ids}


def factory() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``ak-tune --model benchmarks/bench_e2e.py:factory``: the benchmark's model and one batch."""
    dims = json.loads(os.environ.get(CONFIG_ENV, json.dumps(FULL)))
    return build(dims, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled(impl: str, model: torch.nn.Module, cache_dir: str | None) -> Any:
    if impl in ("eager", "liger"):
        return model
    if impl == "inductor":
        return torch.compile(model)
    if impl == "inductor-max-autotune":
        return torch.compile(model, mode="max-autotune-no-cudagraphs")
    options = {"autokernel.cache_dir": cache_dir} if cache_dir else None
    return torch.compile(model, backend="autokernel", options=options)


def measure_step(fwd: Any, model: torch.nn.Module, inputs: dict[str, torch.Tensor], iters: int,
                 device: torch.device, memory: bool = False, profile: bool = False) -> dict[str, Any]:
    """One training step (forward with labels, backward, gradients dropped) of ``fwd``, which runs ``model``:
    the first step's seconds (compile included), then two warm-up steps and the median ms of ``iters`` steps
    (CUDA events; wall clock on the CPU), the peak memory above what the warm model holds, and the loss.
    ``memory`` (CUDA): also what is alive at the step's peak (:func:`live_at_peak`), from one more step;
    ``profile`` (CUDA): also where one more step's GPU time goes (:func:`kernel_profile`)."""
    def step() -> torch.Tensor:
        loss = fwd(**inputs).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    sync(device)
    base_mem = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20 if device.type == "cuda" else None
    row = {"ms": round(times[len(times) // 2], 3), "peak_mib": None if peak is None else round(peak, 1),
           "loss": float(loss), "first_step_s": round(first_s, 2)}
    if memory and device.type == "cuda":
        # One more step with the allocator's history on (after the timed ones: recording costs host time).
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        traced_peak, blocks = live_at_peak(snapshot["device_traces"][device.index or 0])
        row["peak_blocks"] = {"traced_peak_mib": round(traced_peak / 2**20, 1),
                              "by_size": [[round(size / 2**20, 2), count] for size, count in blocks[:MEMORY_ROWS]]}
    if profile and device.type == "cuda":
        row["kernels"] = kernel_profile(step, device)
    return row


def kernel_category(name: str) -> str:
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def kernel_profile(step: Any, device: torch.device) -> dict[str, Any]:
    """:func:`span_summary` of one ``step`` under ``torch.profiler``, and the GPU's waits before the step's first
    kernel and after its last (:func:`edge_waits`): a one-element add on either side brackets the step on the GPU's
    clock. The first runs at once (the GPU is idle), the second once the host has returned from the step and the
    GPU has run the step's kernels, which is where the timed steps record their CUDA events."""
    marker = torch.zeros(1, device=device)

    def bracketed() -> None:
        marker.add_(1)
        step()
        marker.add_(1)

    spans = sorted(gpu_spans(bracketed, device))
    return {**span_summary(spans[1:-1]), **edge_waits(spans)}


def edge_waits(spans: Sequence[tuple[float, float, str]]) -> dict[str, float]:
    """From a step's GPU spans sorted by start, bracketed by a marker kernel on either side (:func:`kernel_profile`):
    how long the GPU waited for the host before the step's first kernel and after its last, in ms."""
    if len(spans) < 3:
        raise ValueError(f"edge_waits: expected a marker, the step's kernels and a marker, got {len(spans)} spans")
    last_end = max(end for _, end, _ in spans[1:-1])
    return {"wait_before_first_kernel_ms": round(spans[1][0] - spans[0][1], 3),
            "wait_after_last_kernel_ms": round(spans[-1][0] - last_end, 3)}


def span_summary(spans: Sequence[tuple[float, float, str]]) -> dict[str, Any]:
    """GPU time of :func:`gpu_spans`' spans by kernel category (:data:`KERNEL_CATEGORIES`), the :data:`PROFILE_TOP`
    longest kernels by name (the table's) and every kernel by name (``by_name``, in the JSON only: where a category's
    time goes, e.g. Inductor's own kernels in autokernel's step), in ms. The sum is kernel time only: gaps between
    kernels (host-bound stretches) are the step's time less this sum."""
    by_name: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for start, end, name in spans:
        by_name[name] += end - start
        calls[name] += 1
    by_category: Counter[str] = Counter()
    for name, ms in by_name.items():
        by_category[kernel_category(name)] += ms
    idle, gaps = idle_gaps(spans)
    kernels = [[name[:160], kernel_category(name), calls[name], round(ms, 4)] for name, ms in by_name.most_common()]
    return {"total_ms": round(sum(by_name.values()), 3),
            "by_category": {k: round(v, 3) for k, v in by_category.most_common()},
            "top": kernels[:PROFILE_TOP],
            "by_name": kernels,
            "idle_between_kernels_ms": round(idle, 3),
            "gaps": [[round(ms, 3), before[:60], after[:60]] for ms, before, after in gaps]}


def gpu_spans(step: Any, device: torch.device) -> list[tuple[float, float, str]]:
    """Every GPU activity (kernel, copy, set) of one ``step`` under ``torch.profiler``, as ``(start_ms, end_ms,
    name)`` in the order the profiler lists them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return [(e.time_range.start / 1e3, e.time_range.end / 1e3, e.name) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def idle_gaps(spans: Sequence[tuple[float, float, str]], top: int = PROFILE_GAPS,
              least_ms: float = 0.02) -> tuple[float, list[tuple[float, str, str]]]:
    """From GPU activity spans ``(start_ms, end_ms, name)``: the time between the first start and the last end when
    nothing ran, and the ``top`` longest such gaps of at least ``least_ms`` as ``(ms, the kernel that ended, the one
    that started)``: where the GPU waited on the host."""
    idle, gaps = 0.0, []
    busy_until, last = None, ""
    for start, end, name in sorted(spans):
        if busy_until is not None and start > busy_until:
            idle += start - busy_until
            if start - busy_until >= least_ms:
                gaps.append((start - busy_until, last, name))
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return idle, sorted(gaps, key=lambda g: -g[0])[:top]


def live_at_peak(events: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[int, int]]]:
    """From the CUDA caching allocator's trace of one step (``torch.cuda.memory._snapshot()["device_traces"]``):
    the most bytes that step's allocations held at once, and the blocks alive at that moment as (size, count),
    most bytes first. Blocks allocated before the trace started (the weights) are not in it. In a model of known
    dimensions the sizes name the tensors: what a step keeps alive at its peak, and what to cut."""
    def replay(stop: int) -> tuple[dict[int, int], int, int]:
        """The blocks alive after the first ``stop`` events, and the most bytes held and the event it was at."""
        live: dict[int, int] = {}
        held = peak = at = 0
        for i, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event["size"]
                held += event["size"]
                if held > peak:
                    peak, at = held, i + 1
            elif event["action"] == "free_completed":
                held -= live.pop(event["addr"], 0)
        return live, peak, at

    _live, peak, at = replay(len(events))
    at_peak, _peak, _at = replay(at)  # a second pass to the peak: no copy of the live set at each new high
    counts = Counter(at_peak.values())
    return peak, sorted(counts.items(), key=lambda item: -item[0] * item[1])


def time_impl(impl: str, base: torch.nn.Module, inputs: dict[str, torch.Tensor], iters: int,
              device: torch.device, cache_dir: str | None, memory: bool = False,
              profile: bool = False) -> dict[str, Any]:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    if impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    row: dict[str, Any] = {"impl": impl, **measure_step(compiled(impl, model, cache_dir), model, inputs, iters, device,
                                                        memory, profile)}
    row["loss"] = round(row["loss"], 5)
    if impl == "autokernel":
        import autokernel

        options = {"autokernel.cache_dir": cache_dir} if cache_dir else None
        torch._dynamo.reset()  # explain must trace the whole model, not reuse the compiled frames
        report = autokernel.explain(model, **inputs, options=options)
        counts = Counter(f"{i.pattern}:{i.status}" for i in report.instances)
        row["instances"] = dict(sorted(counts.items()))
    return row


def run_tune(dims: dict[str, int], minutes: float, cache_dir: str | None, out: Path, script: Path = Path(__file__),
             extra: Sequence[str] = (), log_name: str = "llama-step-tune.log") -> dict[str, Any]:
    """``ak-tune --model SCRIPT:factory --budget MINUTES [EXTRA]`` on the model of ``dims`` (passed to the
    factory in ak-tune's process through ``CONFIG_ENV``); its output is kept in ``out/log_name``."""
    env = dict(os.environ, **{CONFIG_ENV: json.dumps(dims)})
    cmd = [sys.executable, "-m", "autokernel.playbook.cli", "--model", f"{script.resolve()}:factory",
           "--budget", str(minutes), "--quiet", *extra]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / log_name).write_text(proc.stdout + proc.stderr)  # the ranking table and each shape's result
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", sep="\n", flush=True)
    return {"command": shlex.join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1)}


def render_md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    eager = next((r for r in rows if r["impl"] == "eager" and "ms" in r), None)
    lines = [f"# llama-step benchmark ({meta['case']})", "",
             f"- device: {meta['device']}", f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
             f"- command: `{meta['command']}`"]
    if meta.get("tune"):
        t = meta["tune"]
        lines.append(f"- cache filled by `{t['command']}` in {t['wall_s']} s (exit {t['returncode']})")
    lines += ["", "| impl | ms/step | tokens/s | peak MiB above weights | first step s | loss | vs eager loss | "
              "instances |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error'][:120]} | | | | | | |")
            continue
        dl = f"{r['loss'] - eager['loss']:+.4f}" if eager else "-"
        inst = ", ".join(f"{k} {v}" for k, v in r.get("instances", {}).items())
        lines.append(f"| {r['impl']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']} | "
                     f"{r['first_step_s']} | {r['loss']:.4f} | {dl} | {inst} |")
    traced = [r for r in rows if r.get("peak_blocks")]
    if traced:
        lines += ["", "Blocks alive at each impl's peak (one traced step, `--memory`): MiB x count, most memory first.",
                  ""]
        for r in traced:
            blocks = ", ".join(f"{mib:g} x {count}" for mib, count in r["peak_blocks"]["by_size"])
            lines.append(f"- {r['impl']}: {r['peak_blocks']['traced_peak_mib']} MiB at the peak: {blocks}")
    profiled = [r for r in rows if r.get("kernels")]
    if profiled:
        lines += ["", "GPU time of one profiled step (`--profile`), ms by kernel category; the step's time less the "
                  "kernels' sum is time the GPU waited.", ""]
        for r in profiled:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in r["kernels"]["by_category"].items())
            waits = [(what, r["kernels"].get(key)) for what, key in (
                ("idle between kernels", "idle_between_kernels_ms"),
                ("before the first", "wait_before_first_kernel_ms"), ("after the last", "wait_after_last_kernel_ms"))]
            between = "".join(f"; {what} {ms:.2f}" for what, ms in waits if ms is not None)
            lines.append(f"- {r['impl']}: kernels {r['kernels']['total_ms']:.2f} of {r['ms']:.2f}: {cats}{between}")
        for r in profiled:
            if r["kernels"].get("gaps"):
                lines += ["", f"{r['impl']}, longest waits between kernels:", "", "| ms | after | before |",
                          "|---|---|---|"]
                lines += [f"| {ms:.3f} | `{before}` | `{after}` |" for ms, before, after in r["kernels"]["gaps"]]
        for r in profiled:
            lines += ["", f"{r['impl']}, longest kernels:", "", "| kernel | category | calls | ms |",
                      "|---|---|---|---|"]
            lines += [f"| `{name[:90]}` | {cat} | {n} | {ms:.3f} |" for name, cat, n, ms in r["kernels"]["top"]]
    return "\n".join(lines) + "\n"


def run_header(device: torch.device, launch: list[str], argv: Sequence[str] | None) -> dict[str, Any]:
    """A results file's header (``BENCH_FORMAT.md``): device, versions, date and the command (``launch`` and the
    script's arguments)."""
    import triton

    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "command": shlex.join([*launch, *(sys.argv[1:] if argv is None else argv)])}


def describe_run(device: torch.device, dims: dict[str, int], launch: list[str],
                 argv: Sequence[str] | None) -> dict[str, Any]:
    """:func:`run_header` and the model's case."""
    return {**run_header(device, launch, argv), "case": case_name(dims)}


def compile_cold() -> None:
    """First-step times compare compilers, not caches: no impl may reuse another's (or ak-tune's) compiled graphs."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def step_parser(description: str, impls: Sequence[str], default_impls: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark of the model's step: --impls (checked by ``parse_step_args``), --iters,
    --cache-dir, --out, --smoke."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--impls", default=default_impls, help=f"comma list of {tuple(impls)}")
    p.add_argument("--iters", type=int, default=10, help="timed steps per impl (median reported)")
    p.add_argument("--cache-dir", default=None, help="autokernel cache (default: $AUTOKERNEL_CACHE_DIR)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    return p


def parse_step_args(p: argparse.ArgumentParser, argv: Sequence[str] | None, impls: Sequence[str]) -> argparse.Namespace:
    """``p``'s arguments, with ``impl_list``: the --impls, each one of ``impls``."""
    args = p.parse_args(argv)
    args.impl_list = args.impls.split(",")
    for impl in args.impl_list:
        if impl not in impls:
            p.error(f"unknown impl {impl!r}; known: {tuple(impls)}")
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = step_parser(__doc__.splitlines()[0], IMPLS, DEFAULT_IMPLS, "tiny config on the CPU: tests the plumbing only")
    p.add_argument("--tune", type=float, default=None, metavar="MIN",
                   help="run ak-tune --model first: its ranking, then MIN minutes of tuning")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: one more step per impl under torch.profiler; its GPU time by kernel category")
    p.add_argument("--memory", action="store_true",
                   help="CUDA: one more step per impl, its allocations traced; the blocks alive at its peak, by size")
    return parse_step_args(p, argv, IMPLS)


def results_dir(out: str | None, smoke: bool, prefix: str) -> Path:
    """Where a benchmark writes its results (created): ``--out``, else a fresh temporary folder for a smoke
    run (its figures mean nothing), else ``benchmarks/results``."""
    path = Path(out) if out else (Path(tempfile.mkdtemp(prefix=prefix)) if smoke else REPO / "benchmarks" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_device(smoke: bool) -> torch.device | None:
    """CUDA, or with ``smoke`` the CPU with Triton's interpreter; None (said on stderr) when CUDA is missing."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports autokernel's kernels
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("CUDA is not available: run on the device machine, or pass --smoke", file=sys.stderr)
        return None
    return torch.device("cuda")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args.smoke)
    if device is None:
        return 2
    cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else os.environ.get("AUTOKERNEL_CACHE_DIR")
    dims = SMOKE if args.smoke else FULL
    out = results_dir(args.out, args.smoke, "bench_e2e_")
    meta = describe_run(device, dims, ["python", "benchmarks/bench_e2e.py"], argv)
    if args.tune is not None and "autokernel" in args.impl_list:
        meta["tune"] = run_tune(dims, args.tune, cache_dir, out)
    compile_cold()
    base, inputs = build(dims, device)
    tokens = dims["batch"] * dims["seq"]
    rows = []
    # Liger patches transformers' Llama module itself (its RMSNorm, MLP, RoPE and the causal-LM forward),
    # not only the model it is given: every impl built after it in this process would run Liger's code.
    for impl in sorted(args.impl_list, key=lambda name: name == "liger"):
        try:
            row = time_impl(impl, base, inputs, args.iters, device, cache_dir, args.memory, args.profile)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the impl's copy of the model is gone: its memory goes back
            row["tokens_per_s"] = round(tokens / row["ms"] * 1e3)
        except Exception as exc:  # one impl failing (a missing peer) must not lose the others' rows
            row = {"impl": impl, "error": f"{type(exc).__name__}: {exc}"}
        row = {"pattern": "llama-step", "case": meta["case"], "dtype": "bf16" if device.type == "cuda" else "fp32",
               "pass": "fwd+bwd", **row}
        print(json.dumps(row), flush=True)
        rows.append(row)
        # Written after every impl: a run killed at its time limit (a max-autotune compile) keeps the rows before.
        (out / "llama-step.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        md = render_md(meta, rows)
        (out / "llama-step.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
