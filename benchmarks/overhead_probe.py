"""Host-side cost of one RMSNorm call along each layer of the stack (GPU; diagnostics).

Tiny shapes, so the GPU is idle and every figure is host time per call (µs).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from autokernel.cache import default_cache_dir
from autokernel.lowering.rms_norm.kernels import default_config, rms_norm_bwd, rms_norm_fwd
from autokernel.lowering.rms_norm.ops import select_config


@triton.jit
def _noop(X, n, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), 1.0, mask=tl.arange(0, BLOCK) < n)


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn_like(x)
    cfg = default_config(1024, 8, x.dtype)
    cache = str(default_cache_dir())
    buf = torch.empty(16, device="cuda")
    _, rstd = rms_norm_fwd(x, w, 1e-6, 0.0, "llama", x.dtype, cfg, True)

    def hf(x, w):
        h = x.to(torch.float32)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    ak = torch.compile(hf, backend="autokernel")
    ind = torch.compile(hf)

    def train(fn):
        def run():
            fn(xg, wg).backward(dy)
            xg.grad = wg.grad = None
        return run

    rows = {
        "empty torch op (x.new_empty)": lambda: x.new_empty(x.shape),
        "triton launch, no-op kernel": lambda: _noop[(1,)](buf, 16, BLOCK=16),
        "select_config": lambda: select_config(x, w, 0.0, "llama", x.dtype, cache),
        "rms_norm_fwd (wrapper+launch)": lambda: rms_norm_fwd(x, w, 1e-6, 0.0, "llama", x.dtype, cfg, True),
        "rms_norm_bwd (wrapper+launch)": lambda: rms_norm_bwd(dy, x, w, rstd, 0.0, "llama", cfg),
        "op autokernel.rms_norm": lambda: torch.ops.autokernel.rms_norm(x, w, 1e-6, 0.0, "llama", x.dtype, cache),
        "op rms_norm_train, no grad": lambda: torch.ops.autokernel.rms_norm_train(
            x, w, 1e-6, 0.0, "llama", x.dtype, cache),
        "op rms_norm_train + backward": lambda: torch.autograd.backward(
            torch.ops.autokernel.rms_norm_train(xg, wg, 1e-6, 0.0, "llama", x.dtype, cache)[0], dy),
        "eager HF fwd+bwd": train(hf),
        "compiled inductor fwd+bwd": train(ind),
        "compiled autokernel fwd+bwd": train(ak),
    }
    for name, fn in rows.items():
        print(f"{name:34s} {per_call_us(fn):8.1f} us")


if __name__ == "__main__":
    main()
