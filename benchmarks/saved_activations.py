"""What a compiled Llama step saves for its backward, Inductor against autokernel (every pattern instance served
with its family's default kernel): the tensors the autograd saved-tensor hooks pack during one forward, counted
by shape and dtype (one storage saved twice counts once).

python benchmarks/saved_activations.py [--device cpu|cuda]

The partitioner's choice of what to save or recompute depends on the graph, not on the device's speed, so the
CPU (Triton interpreter, tiny dimensions: bench_e2e's model at hidden 64, 2 layers, vocab 256, 96 tokens)
answers which activations the rewrite adds or removes; a GPU run at those dimensions agrees. A diagnostic,
not a benchmark: it prints, writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=2, seq=48)
ITEMSIZE = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.int64: 8, torch.int32: 4}


def saved_by_one_step(fn, model, inputs) -> collections.Counter:
    """(shape, dtype) -> how many distinct storages one forward of ``fn`` saves for its backward."""
    seen: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(**inputs).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return collections.Counter(seen.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before autokernel's kernels are imported
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]
    import bench_e2e
    from models import serve_every_miss

    device = torch.device(args.device)
    model, inputs = bench_e2e.build(DIMS, device)
    model = model.to(torch.bfloat16)
    cache = tempfile.mkdtemp(prefix="saved_activations_")

    def compiled(impl: str):
        torch._dynamo.reset()
        if impl == "inductor":
            return torch.compile(model)
        return torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": cache})

    for impl in ("inductor", "autokernel"):
        if impl == "autokernel":
            saved_by_one_step(compiled(impl), model, inputs)  # records the misses
            served = serve_every_miss(cache, device)
        fn = compiled(impl)
        saved_by_one_step(fn, model, inputs)  # the compile
        counts = saved_by_one_step(fn, model, inputs)
        total = sum(n * torch.Size(s).numel() * ITEMSIZE.get(d, 4) for (s, d), n in counts.items())
        extra = f", {served} pattern instances served" if impl == "autokernel" else ""
        print(f"{impl}: {sum(counts.values())} tensors saved, {total / 1024:.1f} KiB{extra}")
        for (shape, dtype), n in sorted(counts.items(), key=lambda kv: -torch.Size(kv[0][0]).numel()):
            print(f"  {n:3d} x {shape} {str(dtype).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
