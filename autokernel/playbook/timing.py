"""Timing: median of many runs, warm-up excluded, on CUDA events; a wall clock under the interpreter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MIN_TIMED_RUNS = 10  # the fewest runs a median is taken over, however long one run takes


def rep_ms_for(one_run_ms: float, rep_ms: float) -> float:
    """The time ``do_bench`` is given for its timed runs: ``rep_ms``, or more where one run is so long that
    ``rep_ms`` would hold fewer than :data:`MIN_TIMED_RUNS` (``do_bench`` repeats ``rep / estimate`` times:
    linear + cross-entropy at 8192x4096->128256, ~40 ms a run, got 2 runs of 100 ms, and one config timed
    twice in one tuning run gave 44.30 and 41.67 ms)."""
    return max(float(rep_ms), MIN_TIMED_RUNS * one_run_ms * 1.1)  # 1.1: do_bench's estimate may run longer


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in ms over many runs, warm-up excluded: on CUDA, ``triton.testing.do_bench`` (L2
    flushed before each run) over at least :data:`MIN_TIMED_RUNS` runs; elsewhere the wall clock."""
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()  # a first call outside the estimate (allocator, cuBLAS heuristics)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        rep = rep_ms_for(start.elapsed_time(end), rep_ms)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_ms(fn: Callable[[], object], device: torch.device) -> float | None:
    """GPU time of ``fn``: captured once in a CUDA graph and replayed, so the host's launch and Python cost
    drops out (what ``fn`` costs inside a model whose GPU work hides the host; host-inclusive times of a
    compiled fwd+bwd step vary by 2x from run to run on the device machine). The replay reads the same
    inputs each time; do_bench flushes L2 between replays. None off CUDA or where capture fails (a step
    that syncs or allocates on the host)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return median_ms(graph.replay, device)
    except Exception:
        torch.cuda.synchronize(device)
        return None


def gpu_or_host_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """``fn``'s GPU time (:func:`graph_ms`), or its host-inclusive median where there is none; and which clock
    ("gpu" or "host") gave it."""
    ms = graph_ms(fn, device)
    return (ms, "gpu") if ms is not None else (median_ms(fn, device), "host")


def copy_gbps(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second, in GB/s); None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.empty(2**29, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device)
    gbps = 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9
    return gbps


def matmul_tflops(device: torch.device) -> float | None:
    """Dense bf16 matmul rate on random data (8192^3, GPU time), in TFLOP/s: the compute floor's ceiling for
    patterns that hold matmuls (linear + cross-entropy). None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms, _clock = gpu_or_host_ms(lambda: a @ b, device)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12
