"""Host-side cost of one RMSNorm call along each layer of the stack (GPU; diagnostics, not a benchmark).

python benchmarks/overhead_probe.py [--shape 8x1024]

Writes a family entry (built-in default config) for the shape into a temporary cache, so the probe
runs on any GPU. Every figure is wall time per call over a loop, synchronized once at the end: on a
tiny shape the GPU is idle and this is host time. Rows marked "thread" run the same call from a
second Python thread, as the autograd engine runs a CUDA backward.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import types

import torch
import triton
import triton.language as tl

import autokernel.lowering.rms_norm as rms_norm_family
from autokernel.cache import KernelCache, row_bucket
from autokernel.lowering import inline_suffix
from autokernel.lowering.rms_norm.kernels import default_config, rms_norm_bwd, rms_norm_fwd
from autokernel.lowering.rms_norm.ops import pattern_key, select_config


@triton.jit
def _noop(X, n, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), 1.0, mask=tl.arange(0, BLOCK) < n)


def per_call_us(fn, n: int = 1000) -> float:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def in_thread(fn):
    """The per-call figure of ``fn`` when a second thread makes the calls."""
    result = []
    t = threading.Thread(target=lambda: result.append(per_call_us(fn)))
    t.start()
    t.join()
    return result[0]


def probe_cache(rows: int, hidden: int) -> str:
    """A fresh cache dir holding one family entry (built-in default config) for bf16 HF RMSNorm [rows, hidden]."""
    cache = tempfile.mkdtemp()
    kc = KernelCache(cache, device=torch.device("cuda"))
    kc.put_entry({
        "version": 1, "pattern": "rms_norm", "pattern_key": pattern_key("llama", 0.0, *(torch.bfloat16,) * 3),
        "hidden": hidden, "row_bucket": row_bucket(rows), "kernel": {"kind": "family", "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "probe"},
        "checks": [], "created": time.time()})
    kc.close()
    return cache


def separate(fn, name: str):
    """``fn`` with its own code object: Dynamo caches compiled graphs per code object, so two
    torch.compile wrappers of one function with the same backend would share their graphs."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def hf(x, w):
    h = x.to(torch.float32)
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8x1024")
    a = p.parse_args()
    rows_n, hidden = map(int, a.shape.split("x"))
    x = torch.randn(rows_n, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn_like(x)
    cfg = default_config(hidden, rows_n, x.dtype)
    cache = probe_cache(rows_n, hidden)
    buf = torch.empty(16, device="cuda")
    _, rstd = rms_norm_fwd(x, w, 1e-6, 0.0, "llama", x.dtype, cfg, True)

    ak = torch.compile(hf, backend="autokernel", options={"autokernel.cache_dir": cache})
    ind = torch.compile(hf)

    def train(fn):
        def run():
            fn(xg, wg).backward(dy)
            xg.grad = wg.grad = None
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x, w)
        return run

    def single_threaded(fn):
        """``fn`` with the autograd engine running the backward on the calling thread."""
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    # The same graph with the opaque ops (what dynamic shapes get), for comparison with the inline ones.
    rms_norm_family.inline_suffix = lambda inputs: ""
    ak_opaque = torch.compile(separate(hf, "hf_opaque"), backend="autokernel", options={"autokernel.cache_dir": cache})
    train(ak_opaque)()
    no_grad(ak_opaque)()
    rms_norm_family.inline_suffix = inline_suffix

    ops = torch.ops.autokernel
    rows = {
        "empty torch op (x.new_empty)": lambda: x.new_empty(x.shape),
        "triton launch, no-op kernel": lambda: _noop[(1,)](buf, 16, BLOCK=16),
        "select_config": lambda: select_config(x, pattern_key("llama", 0.0, *(x.dtype,) * 3), cache),
        "rms_norm_fwd (wrapper+launch)": lambda: rms_norm_fwd(x, w, 1e-6, 0.0, "llama", x.dtype, cfg, True),
        "rms_norm_bwd (wrapper+launch)": lambda: rms_norm_bwd(dy, x, w, rstd, 0.0, "llama", cfg),
        "op rms_norm (fwd only)": lambda: ops.rms_norm(x, w, 1e-6, 0.0, "llama", x.dtype, cache),
        "op rms_norm_train, no grad": lambda: ops.rms_norm_train(x, w, 1e-6, 0.0, "llama", x.dtype, cache),
        "op rms_norm_backward": lambda: ops.rms_norm_backward(dy, x, w, rstd, 0.0, "llama", x.dtype, cache),
        "op rms_norm_train + backward": lambda: torch.autograd.backward(
            ops.rms_norm_train(xg, wg, 1e-6, 0.0, "llama", x.dtype, cache)[0], dy),
        "eager HF fwd+bwd": train(hf),
        "compiled inductor fwd+bwd": train(ind),
        "compiled autokernel fwd+bwd": train(ak),
        "compiled autokernel fwd+bwd, 1 thread": single_threaded(train(ak)),
        "compiled autokernel opaque fwd+bwd": train(ak_opaque),
        "compiled autokernel opaque fwd, no_grad": no_grad(ak_opaque),
        "compiled inductor fwd+bwd, 1 thread": single_threaded(train(ind)),
        "compiled inductor fwd, no_grad": no_grad(ind),
        "compiled autokernel fwd, no_grad": no_grad(ak),
    }
    threaded = ("triton launch, no-op kernel", "rms_norm_bwd (wrapper+launch)", "op rms_norm_backward")
    print(f"shape {a.shape} on {torch.cuda.get_device_name()}")
    for name, fn in rows.items():
        print(f"{name:36s} {per_call_us(fn):8.1f} us")
        if name in threaded:
            print(f"{name + ' [thread]':36s} {in_thread(fn):8.1f} us")


if __name__ == "__main__":
    main()
