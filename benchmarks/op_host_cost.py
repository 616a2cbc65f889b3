"""Host cost of one call of an opaque op (the dynamic-shape path), the kernel launch left out: what a step pays per
instance where no CUDA graph replays it. CPU, no Triton: ``python benchmarks/op_host_cost.py [--calls N]``.
The GPU's layer-by-layer figures, launches and compiled graphs included, are ``overhead_probe.py``'s.

Times, per call, in microseconds (median of 5 rounds of N calls):
- ``op``: ``torch.ops.autokernel.rms_norm`` (the forward-only RMSNorm op) with the kernel wrapper replaced by one
  that only allocates the outputs;
- ``ours``: the same body called directly (variant key, configuration lookup, the stubbed wrapper): ``op`` minus
  this is the dispatcher's share (the op is a plain ``torch.library.Library`` op: ``define_plain_op``);
- ``custom_op no-op`` / ``Library no-op``: an op that only allocates its output, defined through
  ``torch.library.custom_op`` and through ``torch.library.Library`` with a ``CompositeExplicitAutograd`` kernel:
  what the registration itself costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import autokernel.lowering.rms_norm.ops as rms_norm_ops


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(200):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(rounds), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    calls = p.parse_args().calls
    x, w = torch.randn(8, 64), torch.randn(64)

    def outputs_only(x, weight, eps, offset, mode, out_dtype, config, save_rstd, kernels, traceable):
        return torch.empty_like(x), torch.empty(x.shape[0])

    rms_norm_ops.rms_norm_fwd = outputs_only  # this process only: no kernel runs

    @torch.library.custom_op("ak_host_cost::noop", mutates_args=())
    def noop(x: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
        return torch.empty_like(x)

    lib = torch.library.Library("ak_host_cost", "FRAGMENT")
    lib.define("noop_library(Tensor x, float eps, str mode) -> Tensor")
    lib.impl("noop_library", lambda x, eps, mode: torch.empty_like(x), "CompositeExplicitAutograd")

    op = torch.ops.autokernel.rms_norm.default
    with torch.no_grad():
        rows = {
            "op": per_call_us(lambda: op(x, w, 1e-6, 0.0, "llama", torch.float32, ""), calls),
            "ours": per_call_us(lambda: rms_norm_ops._forward(x, None, w, 1e-6, 0.0, "llama", torch.float32, "",
                                                              False, False), calls),
            "custom_op no-op": per_call_us(lambda: torch.ops.ak_host_cost.noop.default(x, 1e-6, "llama"), calls),
            "Library no-op": per_call_us(lambda: torch.ops.ak_host_cost.noop_library.default(x, 1e-6, "llama"),
                                         calls),
            "empty_like": per_call_us(lambda: torch.empty_like(x), calls),
        }
    print(f"torch {torch.__version__}, {calls} calls x 5 rounds, us per call (median round)")
    print("| what | us |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us} |")


if __name__ == "__main__":
    main()
