"""Timing: median of many runs, warm-up excluded, on CUDA events; a wall clock under the interpreter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second, in GB/s); None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.empty(2**29, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device)
    gbps = 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9
    return gbps
