"""Where does a compiled RMSNorm training step spend its time? (GPU; diagnostics, not a benchmark.)

python benchmarks/profile_rms_norm.py [--shape 8192x8192] [--tuned]
Without --tuned the op serves the built-in default config from a temporary cache (any GPU); with it,
the default cache dir must hold a tuned entry for the shape.
Times the same step three ways: the kernels called directly, the custom ops under eager autograd, and
torch.compile(backend="autokernel"); then prints the profiler's table for the compiled step.
(The launch sweeps of the kernels alone are in ``sweep_norm.py``.)
"""

from __future__ import annotations

import argparse

import torch
from overhead_probe import hf as hf_rms_norm
from overhead_probe import probe_cache
from triton.testing import do_bench

import autokernel
from autokernel.cache import default_cache_dir
from autokernel.lowering.rms_norm.kernels import default_config, rms_norm_bwd, rms_norm_fwd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192x8192")
    p.add_argument("--tuned", action="store_true", help="serve the default cache dir's tuned entry")
    a = p.parse_args()
    rows, hidden = map(int, a.shape.split("x"))
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    cfg = default_config(hidden, rows, x.dtype)
    cache = str(default_cache_dir()) if a.tuned else probe_cache(rows, hidden)

    def direct():
        _, rstd = rms_norm_fwd(x, w, 1e-6, 0.0, "llama", x.dtype, cfg, True)
        rms_norm_bwd(dy, x, w, rstd, 0.0, "llama", cfg)

    def ops():
        y, _ = torch.ops.autokernel.rms_norm_train(x, w, 1e-6, 0.0, "llama", x.dtype, cache)
        y.backward(dy)
        x.grad = w.grad = None

    compiled = torch.compile(hf_rms_norm, backend="autokernel", options={"autokernel.cache_dir": cache})
    inductor = torch.compile(hf_rms_norm)

    def step(fn):
        def run():
            y = fn(x, w)
            y.backward(dy)
            x.grad = w.grad = None
        return run

    def forward_only(fn):
        def run():
            with torch.no_grad():
                fn(x, w)
        return run

    def op_forward_only():
        torch.ops.autokernel.rms_norm(x, w, 1e-6, 0.0, "llama", x.dtype, cache)

    print(autokernel.explain(hf_rms_norm, x, w, options={"autokernel.cache_dir": cache}))
    rows = (("fwd+bwd kernels direct", direct), ("fwd+bwd custom ops, eager autograd", ops),
            ("fwd+bwd compiled autokernel", step(compiled)), ("fwd+bwd compiled inductor", step(inductor)),
            ("fwd custom op direct", op_forward_only), ("fwd compiled autokernel", forward_only(compiled)),
            ("fwd compiled inductor", forward_only(inductor)))
    for name, fn in rows:
        fn()
        # do_bench: per-call latency (L2 cleared between calls); the loop: back-to-back throughput.
        latency = do_bench(fn, warmup=25, rep=200, return_mode="median")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"{name:36s} latency {latency:.4f} ms   back-to-back {start.elapsed_time(end) / 100:.4f} ms/call")
    run = step(compiled)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
