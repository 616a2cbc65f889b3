"""Inference of a Llama-style decoder: prefill, decode steps (static KV cache), and the kernels at decode shapes.

Usage (device machine)::

    python benchmarks/bench_inference.py [--impls eager,inductor,inductor-reduce-overhead,autokernel,autokernel-default]
        [--tune MIN] [--tune-kernels MIN] [--profile] [--steps 256] [--cache-dir DIR]
        [--out benchmarks/results] [--smoke]

The model is bench_e2e.py's (``build``, ``FULL`` dims: hidden 2048, 4 layers, 16 heads / 8 kv heads,
intermediate 8192, vocab 128256, SDPA attention), bf16 random weights, in eval mode, run under
``torch.inference_mode()`` without labels; every forward writes a transformers ``StaticCache``. What is timed:

- ``llama-prefill``, case ``b8-s2048``: one forward of ``input_ids`` [8, 2048] into an empty static cache of 2048
  positions, with ``logits_to_keep=1`` (as ``generate()`` does: the last position's logits only). The cache is
  emptied (``cache.reset()``) before each forward, outside the timed region: ``ms`` is the median of
  ``--prefill-iters`` forwards, each between two CUDA events, after 3 warm-up forwards (compile, CUDA-graph
  recording); ``tokens_per_s`` = 8 x 2048 / ``ms``.
- ``llama-decode``, cases ``b1``, ``b8``, ``b64`` (the batch): a decode step is one forward of one token per
  sequence into a static cache whose first 2048 positions hold a prompt (prefilled eagerly in chunks, untimed).
  After 3 warm-up steps, ``--steps`` steps run back to back (positions 2051 on); a CUDA event is recorded on the
  stream after each step and the host never waits in between, so a step's time is the stream time from the end
  of the step before to its own end: GPU time where the GPU is the bottleneck, the host's launch time where the
  host is. ``ms`` is the median step, ``mean_ms`` the mean, ``tokens_per_s`` = batch / ``ms``. The tokens fed are
  fixed random ids (no sampling in the loop). A static cache attends over all its positions (the unwritten ones
  masked) at every step, so a step's work does not depend on its position; positions come from the cache's own
  counter tensor, so the steps run one compiled graph (``recompiles`` says whether they did).
- ``decode-kernels``: RMSNorm, add + RMSNorm, RoPE (q ``rows x heads x 1 x 128``, k 8 heads) and SwiGLU's
  activation alone at rows 1, 8, 64 and 256 of hidden ``--kernel-hidden`` (4096), forward, bf16, through
  ``bench_patterns.py``'s pattern builders, checks and timing (``bench_pattern``): eager, Inductor and autokernel,
  each as ``us`` (host-inclusive median, do_bench) and ``gpu_us`` (its CUDA-graph replay, ``graph_ms``), and the
  DRAM floor.

Impls: ``eager``; ``inductor`` (``torch.compile``); ``inductor-reduce-overhead`` (``mode="reduce-overhead"``:
CUDA graphs); ``autokernel`` (``backend="autokernel"``, ``mode="reduce-overhead"``; the cache is named by
``AUTOKERNEL_CACHE_DIR``, since torch.compile takes ``mode=`` or ``options=``, not both); ``autokernel-default``
(``backend="autokernel"`` without CUDA graphs: beside ``inductor``, what our ops' host cost does to a step that no
graph replays). Each impl and case is
compiled afresh, with Inductor's FX-graph and AOTAutograd caches off (as in bench_e2e). Rows report ``graphs``
(frames Dynamo compiled), ``recompiles`` (frames compiled again after a guard failed), ``cudagraph_skips`` and
``first_call_s``; the autokernel rows the pattern instances ``autokernel.explain`` finds (hit, miss, declined).
``peak_mib``: peak allocated above the weights and the KV cache, from the first call to the last timed one
(the CUDA-graph pools included); ``steady_peak_mib`` the same from the end of the first call on, so a transient of
the compile (Inductor's benchmarking allocates an L2-sized flush buffer, 50 MiB on an H100) shows in one, not both.

``--tune MIN`` first runs ``ak-tune --model benchmarks/bench_inference.py:factory --inference --decode-batches
1,8,64 --budget MIN`` (the prefill and decode buckets of this model; log in ``llama-inference-tune.log``).
``--tune-kernels MIN`` runs ``ak-tune --pattern ... --forward-only --budget MIN`` on each kernel case (16 runs)
before timing it. ``--profile`` runs ``torch.profiler`` over 5 more decode steps of the autokernel impl and
reports, per case, the share of the GPU's kernel time spent in autokernel's Triton kernels (by pattern family)
and the longest kernels.

Writes ``<out>/llama-decode.json``, ``llama-prefill.json`` and ``decode-kernels.json`` (``BENCH_FORMAT.md``) with
a ``.md`` table each. ``--smoke`` runs a tiny config on the CPU (Triton interpreter; impls eager and autokernel,
the latter through ``aot_eager``, no Inductor; no CUDA graphs there, so ``inductor-reduce-overhead`` rows say
they were skipped) to test the plumbing: its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch._inductor.config

# bench_e2e and bench_patterns beside this file (also when ak-tune loads it), and this checkout's autokernel
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import bench_e2e  # noqa: E402
import bench_patterns  # noqa: E402

from autokernel.playbook.model import Workload, cache_argument, inference_workloads  # noqa: E402

REPO = bench_e2e.REPO
IMPLS = ("eager", "inductor", "inductor-reduce-overhead", "autokernel", "autokernel-default")
SMOKE_IMPLS = "eager,inductor-reduce-overhead,autokernel"
PREFILL = dict(batch=8, seq=2048)
DECODE_BATCHES = (1, 8, 64)
CONTEXT = 2048  # prompt tokens in each sequence's KV cache before the decode steps
SMOKE = dict(prefill=dict(batch=2, seq=16), decode_batches=(1, 2), context=8, steps=4, prefill_iters=2,
             kernel_rows=(1, 4), kernel_hidden=128, head_dim=16)  # rope: 8 heads, as many as k has
WARMUP = 3  # compile, CUDA-graph warm-up and recording
PREFILL_CHUNK = 256  # the decode cases' prompt is prefilled eagerly in chunks of this many tokens
PROFILE_STEPS = 5
KERNEL_PATTERNS = ("rms_norm", "add_rms_norm", "rope", "swiglu")
KERNEL_ROWS = (1, 8, 64, 256)
HEAD_DIM = 128


class Skipped(Exception):
    """An impl that cannot run here; the row says why."""


def model_dims(smoke: bool) -> dict[str, int]:
    """bench_e2e's model with the prefill case's batch and sequence length."""
    return {**(bench_e2e.SMOKE if smoke else bench_e2e.FULL), **(SMOKE["prefill"] if smoke else PREFILL)}


def factory() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``ak-tune --model benchmarks/bench_inference.py:factory --inference``: the model and the prefill batch."""
    dims = json.loads(os.environ.get(bench_e2e.CONFIG_ENV, json.dumps(model_dims(False))))
    model, inputs = bench_e2e.build(dims, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval(), {"input_ids": inputs["input_ids"]}


def compile_impl(impl: str, model: torch.nn.Module, device: torch.device, smoke: bool) -> tuple[Any, dict[str, str]]:
    """The callable an impl runs and what the row should say about how it was compiled."""
    graphs = device.type == "cuda"
    if impl == "eager":
        return model, {}
    if impl == "inductor":
        return torch.compile(model), {}
    if impl == "inductor-reduce-overhead":
        if not graphs:
            raise Skipped("mode='reduce-overhead' replays CUDA graphs: there are none on the CPU")
        return torch.compile(model, mode="reduce-overhead"), {}
    if graphs and impl == "autokernel":  # the cache from AUTOKERNEL_CACHE_DIR: mode= excludes options=
        return torch.compile(model, backend="autokernel", mode="reduce-overhead"), {"mode": "reduce-overhead"}
    options = {"autokernel.compiler": "aot_eager"} if smoke else None
    note = ("default" if graphs else "default: no CUDA graphs on the CPU") + ("; aot_eager (smoke: no Inductor)"
                                                                               if smoke else "")
    return torch.compile(model, backend="autokernel", options=options), {"mode": note}


class CompileCounts:
    """What Dynamo and Inductor compiled between ``__init__`` and ``read``: frames, recompiles (a frame compiled
    again after a guard failed, with the first reasons) and CUDA-graph skips."""

    def __init__(self) -> None:
        from torch._dynamo.utils import clear_compilation_metrics, counters

        clear_compilation_metrics()
        self.skips = counters["inductor"]["cudagraph_skips"]

    def read(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters, get_compilation_metrics

        metrics = get_compilation_metrics()
        reasons = [m.recompile_reason for m in metrics if m.recompile_reason]
        out: dict[str, Any] = {"graphs": len(metrics), "recompiles": len(reasons),
                               "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - self.skips}
        if reasons:
            out["recompile_reasons"] = [r[:200] for r in reasons[:3]]
        return out


class StreamClock:
    """Per-call times on the device's stream: CUDA events recorded between calls, read once at the end (no host
    sync in between); wall-clock marks on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def start_impl(impl: str, model: torch.nn.Module, device: torch.device,
               smoke: bool) -> tuple[Any, dict[str, Any], CompileCounts, int]:
    """An impl compiled afresh (compiles happen at its first call), with its compile counts and peak memory
    measured from here: (callable, row so far, counts, bytes allocated before)."""
    torch._dynamo.reset()
    counts = CompileCounts()
    base = 0
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    fwd, row = compile_impl(impl, model, device, smoke)
    return fwd, row, counts, base


def _peak_mib(device: torch.device, base: int) -> float | None:
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1) if device.type == "cuda" else None


def _end_first_call(device: torch.device, base: int, row: dict[str, Any]) -> None:
    """Record the peak so far (the compile's included) as ``first_call_peak_mib`` and restart the peak count, so
    ``steady_peak_mib`` is what serving costs."""
    row["first_call_peak_mib"] = _peak_mib(device, base)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _end_timing(device: torch.device, base: int, row: dict[str, Any]) -> None:
    """Record ``steady_peak_mib`` (since the first call's end) and ``peak_mib`` (the larger of it and the first
    call's)."""
    row["steady_peak_mib"] = steady = _peak_mib(device, base)
    row["peak_mib"] = max(row["first_call_peak_mib"], steady) if steady is not None else None


def _instances(workload: Workload, model: torch.nn.Module) -> dict[str, int]:
    """Pattern instances of one forward as the autokernel backend sees them (``autokernel.explain``), by status."""
    torch._dynamo.reset()  # explain must trace the model, not reuse the compiled frames
    report = workload.explain(model, options=None)  # the cache from AUTOKERNEL_CACHE_DIR
    return dict(sorted(Counter(f"{i.pattern}:{i.status}" for i in report.instances).items()))


def time_decode(impl: str, model: torch.nn.Module, batch: int, context: int, steps: int, device: torch.device,
                smoke: bool, profile: bool) -> dict[str, Any]:
    from transformers import StaticCache

    cache_arg = cache_argument(model)
    vocab = model.config.vocab_size
    extra = (PROFILE_STEPS if profile else 0) + 1  # the profiled steps, and explain's forward
    cache = StaticCache(config=model.config, max_cache_len=context + WARMUP + steps + extra)
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    tokens = [torch.randint(0, vocab, (batch, 1), generator=gen).to(device) for _ in range(WARMUP + steps + extra)]
    with torch.inference_mode():
        for chunk in prompt.split(PREFILL_CHUNK, dim=1):  # eager: the cache allocates its tensors outside compile
            model(input_ids=chunk, **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
    bench_patterns.sync(device)
    fwd, row, counts, base = start_impl(impl, model, device, smoke)
    position = iter(tokens)

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead: CUDA graphs may reuse them
        fwd(input_ids=next(position), **{cache_arg: cache}, use_cache=True)

    clock = StreamClock(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        step()
        bench_patterns.sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        _end_first_call(device, base, row)
        for _ in range(WARMUP - 1):
            step()
        clock.mark()
        for _ in range(steps):
            step()
            clock.mark()
        times = clock.intervals_ms()
        _end_timing(device, base, row)
        if profile and impl == "autokernel":
            row["profile"] = profile_share(step, device)
    row.update(counts.read())
    median = statistics.median(times)
    row.update(ms=round(median, 4), mean_ms=round(statistics.fmean(times), 4),
               tokens_per_s=round(batch / median * 1e3), context=context, steps=steps)
    if impl.startswith("autokernel"):
        inputs = {"input_ids": next(position), cache_arg: cache, "use_cache": True}
        row["instances"] = _instances(Workload("decode step", inputs, train=False), model)
    return row


def time_prefill(impl: str, model: torch.nn.Module, ids: torch.Tensor, iters: int, device: torch.device,
                 smoke: bool) -> dict[str, Any]:
    # ak-tune --inference's own prefill: a static cache of seq positions, allocated by one eager forward
    (prefill,) = inference_workloads(model, {"input_ids": ids}, decode_batches=())
    fwd, row, counts, base = start_impl(impl, model, device, smoke)
    clock = StreamClock(device)
    with torch.inference_mode():
        for i in range(WARMUP + iters):
            prefill.rewind()  # an empty cache for every forward, outside the timed region
            torch.compiler.cudagraph_mark_step_begin()
            t0 = time.perf_counter()
            clock.mark()
            fwd(**prefill.inputs)
            clock.mark()
            if i == 0:
                bench_patterns.sync(device)
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                _end_first_call(device, base, row)
        times = clock.intervals_ms()[2 * WARMUP::2]  # each forward's own interval, warm-up dropped
        _end_timing(device, base, row)
    row.update(counts.read())
    median = statistics.median(times)
    row.update(ms=round(median, 4), tokens_per_s=round(ids.numel() / median * 1e3))
    if impl.startswith("autokernel"):
        row["instances"] = _instances(prefill, model)
    return row


def kernel_families() -> dict[str, str]:
    """Name of each of autokernel's Triton kernels (the jit functions of ``autokernel/lowering/*/kernels.py``, and
    the names a cached source kernel defines) -> its pattern family."""
    import importlib

    from triton.runtime.jit import KernelInterface

    from autokernel.lowering import FAMILY_MODULES

    names: dict[str, str] = {}
    for family in FAMILY_MODULES:
        for part in ("kernels", "ops"):
            try:
                module = importlib.import_module(f"autokernel.lowering.{family}.{part}")
            except ImportError:
                continue
            for value in vars(module).values():
                if isinstance(value, KernelInterface) and hasattr(value, "fn"):
                    names[value.fn.__name__] = family
            for constant in ("FWD_KERNEL", "BWD_KERNEL"):
                if isinstance(getattr(module, constant, None), str):
                    names[getattr(module, constant)] = family
    return names


def profile_share(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """torch.profiler over ``PROFILE_STEPS`` more steps: the GPU's kernel time per step, the share of it in
    autokernel's kernels (per family) and the longest kernels. Kernels are told apart by name: ours keep their
    jit function's name (Inductor may add a suffix), Inductor's start with ``triton_``."""
    if device.type != "cuda":
        return {"skipped": "no GPU kernels to profile on the CPU"}
    from torch.profiler import ProfilerActivity, profile

    ours = kernel_families()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize(device)
    per_kernel: Counter[str] = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us()
    total = sum(per_kernel.values())
    if not total:
        return {"skipped": "the profiler saw no kernels (kernels replayed from CUDA graphs may be hidden from it)"}

    def family(name: str) -> str | None:
        return next((f for k, f in ours.items() if name == k or name.startswith(k + "_")), None)

    by_family: Counter[str] = Counter()
    for name, us in per_kernel.items():
        by_family[family(name) or "other"] += us
    return {"kernel_us_per_step": round(total / PROFILE_STEPS, 1),
            "ours_pct": round(100 * (total - by_family["other"]) / total, 1),
            "pct_by_family": {f: round(100 * us / total, 1) for f, us in by_family.most_common()},
            "top_kernels": [{"name": name[:90], "us_per_step": round(us / PROFILE_STEPS, 2),
                             "family": family(name) or "other"} for name, us in per_kernel.most_common(8)]}


def kernel_rows(args: argparse.Namespace, device: torch.device, cache_dir: str | None) -> list[dict[str, Any]]:
    """The decode-shape kernels through bench_patterns (its builders, checks and timing), µs added."""
    row_counts, hidden = ((SMOKE["kernel_rows"], SMOKE["kernel_hidden"]) if args.smoke
                          else (KERNEL_ROWS, args.kernel_hidden))
    head_dim = SMOKE["head_dim"] if args.smoke else HEAD_DIM
    ctx = bench_patterns.Ctx(device=device, smoke=args.smoke, cache_dir=cache_dir, tune=args.tune_kernels is not None,
                             tune_budget=args.tune_kernels)
    gbps = bench_patterns.copy_gbps(ctx)
    impls = [i for i in ("eager", "inductor", "autokernel") if i in args.kernel_impls]
    out = []
    for name in KERNEL_PATTERNS:
        if name == "rope":  # q [rows, heads, 1 position, head_dim]; k has bench_patterns.ROPE_KV_HEADS heads
            cases = [f"{r}x{hidden // head_dim}x1x{head_dim}" for r in row_counts]
        else:
            cases = [f"{r}x{hidden}" for r in row_counts]
        ns = argparse.Namespace(shapes=",".join(cases), impl_list=impls, pass_list=["fwd"], verbose=False)
        out += bench_patterns.bench_pattern(name, bench_patterns.PATTERNS[name], ns, ctx, gbps)
    for row in out:
        for key in ("ms", "gpu_ms"):
            if row.get(key) is not None:
                row[key.replace("ms", "us")] = round(row[key] * 1e3, 3)
    return out


def _fmt_instances(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.get("instances", {}).items())


def render_model_md(title: str, meta: dict[str, Any], rows: list[dict[str, Any]], what: str) -> str:
    lines = [f"# {title}", "", f"- device: {meta['device']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"date {meta['date']}", f"- command: `{meta['command']}`", f"- model: {meta['model']}", f"- {what}"]
    if meta.get("tune"):
        t = meta["tune"]
        lines.append(f"- cache filled by `{t['command']}` in {t['wall_s']} s (exit {t['returncode']})")
    lines += ["", "| case | impl | ms | tokens/s | mean ms | peak MiB | after the first call | first call s | graphs | "
              "recompiles | CUDA-graph skips | instances |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if r.get("ms") is None:
            why = r.get("skipped") or f"error: {r.get('error', '')}"
            lines.append(f"| {r['case']} | {r['impl']} | — | | | | | | | | | {why[:100]} |")
            continue
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r['tokens_per_s']} | {r.get('mean_ms', '')} | "
                     f"{r['peak_mib']} | {r.get('steady_peak_mib')} | {r['first_call_s']} | {r['graphs']} | "
                     f"{r['recompiles']} | {r['cudagraph_skips']} | {_fmt_instances(r)} |")
        if r.get("mode"):
            notes.append(f"- {r['case']} {r['impl']}: mode {r['mode']}")
        if r.get("recompile_reasons"):
            notes.append(f"- {r['case']} {r['impl']} recompiled: {'; '.join(r['recompile_reasons'])}")
        profile = r.get("profile")
        if profile:
            if "skipped" in profile:
                notes.append(f"- {r['case']} {r['impl']} profile: {profile['skipped']}")
            else:
                top = ", ".join(f"{k['name'][:40]} {k['us_per_step']} us ({k['family']})"
                                for k in profile["top_kernels"][:5])
                notes.append(f"- {r['case']} {r['impl']} profile: {profile['kernel_us_per_step']} us of kernels per "
                             f"step, {profile['ours_pct']}% in autokernel's ({profile['pct_by_family']}); "
                             f"longest: {top}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def render_kernels_md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["# decode-shape kernels", "", f"- device: {meta['device']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
             f"- command: `{meta['command']}`", "",
             "Forward, µs: host-inclusive median [GPU time of the same call replayed from a CUDA graph]. "
             "`(miss)`: autokernel had no cached kernel and ran Inductor's; `(WRONG)`: differs from eager. "
             "Last column: Inductor's GPU time / autokernel's (>1: autokernel faster).", "",
             "| pattern | case | eager | inductor | autokernel | floor | inductor / autokernel, GPU |",
             "|---|---|---|---|---|---|---|"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        if r.get("us") is None:
            return "error"
        text = f"{r['us']:.2f}" + (f" [{r['gpu_us']:.2f}]" if r.get("gpu_us") is not None else "")
        if r.get("ok") is False:
            text += " (WRONG)"
        if r["impl"] == "autokernel" and r.get("cache") != "hit":
            text += " (miss)"
        return text

    seen: list[tuple[str, str]] = []
    for r in rows:
        if (r["pattern"], r["case"]) not in seen:
            seen.append((r["pattern"], r["case"]))
    notes = []
    for pattern, case in seen:
        by = {r["impl"]: r for r in rows if (r["pattern"], r["case"]) == (pattern, case)}
        ours, theirs = by.get("autokernel", {}), by.get("inductor", {})
        ratio = (f"{theirs['gpu_us'] / ours['gpu_us']:.2f}x" if ours.get("gpu_us") and theirs.get("gpu_us") else "—")
        lines.append(f"| {pattern} | {case} | {cell(by.get('eager'))} | {cell(by.get('inductor'))} | "
                     f"{cell(by.get('autokernel'))} | {cell(by.get('floor'))} | {ratio} |")
        notes += [f"- {pattern} {case} {r['impl']}: {r['error']}" for r in by.values() if r.get("error")]
        if ours and ours.get("cache") != "hit" and ours.get("reason"):
            notes.append(f"- {pattern} {case} autokernel miss: {ours['reason']}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default=None, help=f"comma list of {IMPLS} (default: all; --smoke: {SMOKE_IMPLS})")
    p.add_argument("--steps", type=int, default=256, help="timed decode steps per case (default 256)")
    p.add_argument("--prefill-iters", type=int, default=10, help="timed prefill forwards per impl (default 10)")
    p.add_argument("--kernel-hidden", type=int, default=4096, help="hidden size of the kernel cases (default 4096)")
    p.add_argument("--kernel-impls", default="eager,inductor,autokernel", help="impls of the kernel cases")
    p.add_argument("--skip", default="", help="comma list of parts not to run: decode, prefill, kernels")
    p.add_argument("--tune", type=float, default=None, metavar="MIN",
                   help="run ak-tune --model ...:factory --inference first: its ranking, then MIN minutes of tuning")
    p.add_argument("--tune-kernels", type=float, default=None, metavar="MIN",
                   help="run ak-tune --pattern ... --forward-only on each kernel case first, MIN minutes each")
    p.add_argument("--profile", action="store_true", help="profile 5 more decode steps of the autokernel impl")
    p.add_argument("--cache-dir", default=None, help="sets AUTOKERNEL_CACHE_DIR (default: the environment's)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU: tests the plumbing only")
    args = p.parse_args(argv)
    args.impl_list = (args.impls or (SMOKE_IMPLS if args.smoke else ",".join(IMPLS))).split(",")
    for impl in args.impl_list:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}; known: {IMPLS}")
    args.kernel_impls = args.kernel_impls.split(",")
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - {"decode", "prefill", "kernels"}:
        p.error(f"--skip takes decode, prefill, kernels; got {sorted(args.skip)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_e2e.bench_device(args.smoke)
    if device is None:
        return 2
    if args.cache_dir:
        os.environ["AUTOKERNEL_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    cache_dir = os.environ.get("AUTOKERNEL_CACHE_DIR")
    out = bench_e2e.results_dir(args.out, args.smoke, "bench_inference_")
    import transformers

    dims = model_dims(args.smoke)
    decode_batches = SMOKE["decode_batches"] if args.smoke else DECODE_BATCHES
    context = SMOKE["context"] if args.smoke else CONTEXT
    steps = SMOKE["steps"] if args.smoke else args.steps
    prefill_iters = SMOKE["prefill_iters"] if args.smoke else args.prefill_iters
    meta: dict[str, Any] = {
        **bench_e2e.run_header(device, ["python", "benchmarks/bench_inference.py"], argv),
        "transformers": transformers.__version__, "model": {k: v for k, v in dims.items() if k not in ("batch", "seq")},
    }
    if args.tune is not None and "autokernel" in args.impl_list:
        extra = ["--inference", "--decode-batches", ",".join(map(str, decode_batches))]
        meta["tune"] = bench_e2e.run_tune(dims, args.tune, cache_dir, out, script=Path(__file__), extra=extra,
                                          log_name="llama-inference-tune.log")
    # First-call times compare compilers, not caches: no impl may reuse another's (or ak-tune's) compiled graphs.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    model, inputs = bench_e2e.build(dims, device)
    model.eval()
    dtype = "bf16" if device.type == "cuda" else "fp32"
    tables = []

    def run_rows(pattern: str, cases: list[tuple[str, Callable[[str], dict[str, Any]]]],
                 save: Callable[[list[dict[str, Any]]], str]) -> list[dict[str, Any]]:
        """Measure every impl of every case; the results are saved after each row, so a run stopped at a time
        limit keeps what it measured."""
        rows: list[dict[str, Any]] = []
        md = ""
        for case, measure in cases:
            for impl in args.impl_list:
                row: dict[str, Any] = {"pattern": pattern, "case": case, "dtype": dtype, "pass": "fwd", "impl": impl}
                try:
                    row.update(measure(impl))
                except Skipped as why:
                    row.update(ms=None, peak_mib=None, skipped=str(why))
                except Exception as exc:  # one impl failing must not lose the others' rows
                    row.update(ms=None, peak_mib=None, error=f"{type(exc).__name__}: {exc}"[:500])
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
                md = save(rows)
        tables.append(md)
        return rows

    def write(name: str, rows: list[dict[str, Any]], md: str) -> str:
        (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / f"{name}.md").write_text(md)
        return md

    if "decode" not in args.skip:
        run_rows("llama-decode", [(f"b{b}", lambda impl, b=b: time_decode(
            impl, model, b, context, steps, device, args.smoke, args.profile)) for b in decode_batches],
            lambda rows: write("llama-decode", rows, render_model_md(
                "llama-decode", meta, rows, f"one decode step (1 token per sequence) after a {context}-token prompt "
                f"in a static KV cache; median of {steps} steps back to back, stream time between step ends")))
    if "prefill" not in args.skip:
        ids = inputs["input_ids"]
        case = f"b{ids.shape[0]}-s{ids.shape[1]}"
        run_rows("llama-prefill", [(case, lambda impl: time_prefill(
            impl, model, ids, prefill_iters, device, args.smoke))],
            lambda rows: write("llama-prefill", rows, render_model_md(
                "llama-prefill", meta, rows, f"one forward of {ids.shape[0]}x{ids.shape[1]} tokens into an empty "
                f"static KV cache (logits of the last position only); median of {prefill_iters}")))
    if "kernels" not in args.skip:
        rows = kernel_rows(args, device, cache_dir)
        tables.append(write("decode-kernels", rows, render_kernels_md(meta, rows)))
    bench_patterns.print_tables(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
