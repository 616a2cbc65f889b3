"""Where RoPE's in-context time goes (GPU; diagnostics, not a benchmark).

python benchmarks/profile_rope_context.py [--shape 4x32x4096x128] [--kv-heads 8]

ak-tune's in-context race compiles RoPE as models call it (q and k as transposed [B, S, H, D] views, HF's
rotate_half) and found our kernels 0.2577 ms fwd+bwd alone but 0.4929 in context, against Inductor's 0.478 either
way (H100, 2026-12-07). This compiles that step twice, Inductor and autokernel (a cache entry with the default
config forced in), profiles one step of each and prints every GPU kernel with its time: what the step runs
besides the rotation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_e2e import gpu_spans  # noqa: E402
from models import rope_entry  # noqa: E402

import autokernel  # noqa: E402
from autokernel.cache import KernelCache  # noqa: E402
from autokernel.lowering.rope.kernels import rotate  # noqa: E402  (HF's rotate_half for layout "half")


def step_fn(qb, kb, cos, sin):
    q, k = qb.transpose(1, 2), kb.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate(q, "half") * sin, k * cos + rotate(k, "half") * sin


def profile_step(fn, args, grads) -> list[tuple[str, float]]:
    """Each GPU kernel of one fwd+bwd step of ``fn`` after three warm-up steps: (name, ms)."""
    def step():
        leaves = [a.detach().requires_grad_(True) if i < 2 else a for i, a in enumerate(args)]
        torch.autograd.backward(fn(*leaves), grads)

    for _ in range(3):
        step()
    return [(name, end - start) for start, end, name in gpu_spans(step, torch.device("cuda"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x32x4096x128", help="BxHxSxD of q")
    p.add_argument("--kv-heads", type=int, default=8)
    a = p.parse_args()
    b, h, s, d = (int(v) for v in a.shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    qb = torch.randn(b, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    kb = torch.randn(b, s, a.kv_heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
    ang = torch.rand(b, s, d // 2, device="cuda", generator=g) * 100
    cos, sin = (torch.cat((t, t), -1).to(torch.bfloat16) for t in (ang.cos(), ang.sin()))
    grads = (torch.randn(b, h, s, d, device="cuda", generator=g, dtype=torch.bfloat16),
             torch.randn(b, a.kv_heads, s, d, device="cuda", generator=g, dtype=torch.bfloat16))
    cache_dir = tempfile.mkdtemp(prefix="ak-rope-")
    options = {"autokernel.cache_dir": cache_dir}
    leaves = (qb.requires_grad_(True), kb.requires_grad_(True), cos, sin)
    report = autokernel.explain(step_fn, *leaves, options=options)
    cache = KernelCache(cache_dir, device="cuda")
    for inst in report.instances:
        if inst.pattern == "rope":
            cache.put_entry(rope_entry(inst, {}))
    cache.close()
    for impl in ("inductor", "autokernel"):
        torch._dynamo.reset()
        fn = (torch.compile(step_fn) if impl == "inductor"
              else torch.compile(step_fn, backend="autokernel", options=options))
        kernels = profile_step(fn, (qb, kb, cos, sin), grads)
        print(f"== {impl}: {len(kernels)} kernels, {sum(ms for _, ms in kernels):.4f} ms")
        for name, ms in kernels:
            print(f"   {ms:8.4f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
