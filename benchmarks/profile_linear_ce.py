"""Where does chunked linear + cross-entropy spend its time? (GPU; diagnostics, not a benchmark.)

python benchmarks/profile_linear_ce.py [--shapes 8192x2048x128256,8192x4096x128256] [--chunks 512,1024,2048,4096]

For each shape (tokens x hidden x vocab, bf16, reduction mean) and rows per chunk: the whole training call
(``linear_cross_entropy`` with every gradient) and its parts summed over the chunks -- the logits matmul, the same
logits computed as ``W @ h^T`` (the other orientation), the cross-entropy kernel, ``dh = G @ W``,
``dW (+)= G^T @ h`` (and both from vocabulary-major ``G``) and the same products overwriting ``dW`` (what its
per-chunk read-modify-write costs) -- each as GPU time (CUDA-graph replay). Beside them: Inductor's compile of
``cross_entropy(linear(h, W).float(), y)`` forward + backward, Liger's fused linear cross-entropy, and the matmuls'
floor (3 x 2 N H V FLOP at the measured bf16 matmul rate).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from autokernel.lowering.cross_entropy.kernels import count_valid, launch_rows
from autokernel.lowering.linear_cross_entropy.kernels import Grads, default_config, linear_cross_entropy
from autokernel.playbook.timing import gpu_or_host_ms, matmul_tflops


def gpu_ms(fn) -> float:
    """GPU time from graph replay; the host-inclusive median where capture fails."""
    return gpu_or_host_ms(fn, torch.device("cuda"))[0]


def profile_chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> dict[str, Any]:
    """The whole training call (its time, and its kernels summed by name) and its parts, summed over the chunks."""
    n, hid = h.shape
    v = w.shape[0]
    base = default_config(n, hid, v, h.dtype)
    cfg = type(base)(**{**base.__dict__, "train_chunk_rows": chunk, "fwd_chunk_rows": chunk})
    def whole():
        linear_cross_entropy(h, w, None, y, -100, 0.0, "mean", torch.float32, cfg, Grads(True, True, False))

    out = {"ms": gpu_ms(whole)}
    # The same call's kernels as the profiler times them, summed by name: set beside the parts timed alone, they
    # show which kernels run slower when interleaved (session 21: the parts summed 37.6 ms, the call took 40.2).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        whole()
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda k: -k[1])
    out["whole_kernels"] = [{"name": name[:90], "ms": round(ms, 3), "count": count} for name, ms, count in kernels[:8]]
    buf = torch.empty(chunk, v, device=h.device, dtype=h.dtype)
    dx = torch.empty_like(h)
    dw = torch.empty_like(w)
    loss_rows = torch.empty(n, device=h.device, dtype=torch.float32)
    nv = count_valid(y, -100)
    spans = [(s, min(chunk, n - s)) for s in range(0, n, chunk)]

    def mm_fwd():
        for s, m in spans:
            torch.mm(h[s:s + m], w.t(), out=buf[:m])

    buf_t = torch.empty(v, chunk, device=h.device, dtype=h.dtype)

    def mm_fwd_t():
        # The same logits as [V, C] (cuBLAS given the other orientation of the problem): if its heuristics pick a
        # faster kernel here, a cross-entropy kernel reading vocabulary-major tiles would be worth writing.
        for s, m in spans:
            torch.mm(w, h[s:s + m].t(), out=buf_t[:, :m])

    def ce():
        for s, m in spans:
            launch_rows(buf[:m], y[s:s + m], loss_rows[s:s + m], buf[:m], nv, -100, 0.0, "mean", cfg.ce_config())

    def mm_dx():
        for s, m in spans:
            torch.mm(buf[:m], w, out=dx[s:s + m])

    def mm_dw():
        for s, m in spans:
            if s == 0:
                torch.mm(buf[:m].t(), h[s:s + m], out=dw)
            else:
                dw.addmm_(buf[:m].t(), h[s:s + m])

    def mm_dw_fresh():
        # The same products with dW overwritten, never read (wrong sums, timing only): mm_dw less this is what
        # the per-chunk read-modify-write of dW costs.
        for s, m in spans:
            torch.mm(buf[:m].t(), h[s:s + m], out=dw)

    def mm_dx_t():
        # dh and dW from vocabulary-major gradients ([V, C]): dh becomes G^T @ W, dW a plain G @ h.
        for s, m in spans:
            torch.mm(buf_t[:, :m].t(), w, out=dx[s:s + m])

    def mm_dw_t():
        for s, m in spans:
            if s == 0:
                torch.mm(buf_t[:, :m], h[s:s + m], out=dw)
            else:
                dw.addmm_(buf_t[:, :m], h[s:s + m])

    for name, fn in (("mm_fwd", mm_fwd), ("mm_fwd_t", mm_fwd_t), ("ce", ce), ("mm_dx", mm_dx), ("mm_dx_t", mm_dx_t),
                     ("mm_dw", mm_dw), ("mm_dw_t", mm_dw_t), ("mm_dw_fresh", mm_dw_fresh)):
        out[name] = gpu_ms(fn)
    return out


def profile_peers(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> dict[str, float | str]:
    """Inductor's compile of the unfused model code and Liger's fused loss, forward + backward."""
    hr = h.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def model(x, weight, labels):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight).float(), labels)

    compiled = torch.compile(model)

    def inductor_train():
        compiled(hr, wr, y).backward()
        hr.grad = wr.grad = None

    out: dict[str, float | str] = {"inductor": gpu_ms(inductor_train)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_train():
            liger(wr, hr, y).backward()
            hr.grad = wr.grad = None

        out["liger"] = gpu_ms(liger_train)
    except Exception as exc:  # diagnostics: say why the peer is missing, keep the rest
        out["liger"] = repr(exc)[:200]
    torch._dynamo.reset()
    return out


def profile_in_context(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
    """The Llama step's lm_head + loss (``linear``, ``.float()``, ``cross_entropy``, logits returned) compiled with
    ``backend="autokernel"`` serving the family's default config at ``chunk`` rows, against Inductor: GPU time
    of forward + backward, then the profiler's kernel table of one autokernel step."""
    import tempfile
    import time

    from autokernel.cache import KernelCache, row_bucket

    hr = h.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def model(x, weight, labels):
        logits = torch.nn.functional.linear(x, weight)
        return torch.nn.functional.cross_entropy(logits.float(), labels), logits

    def train_of(compiled):
        def train():
            loss, _logits = compiled(hr, wr, y)
            loss.backward()
            hr.grad = wr.grad = None
        return train

    root = tempfile.mkdtemp(prefix="ak-lce-")
    options = {"autokernel.cache_dir": root}
    train_of(torch.compile(model, backend="autokernel", options=options))()  # records the miss
    cache = KernelCache(root, device=h.device)
    n, hid = h.shape
    config = {**default_config(n, hid, w.shape[0], h.dtype).to_dict(), "train_chunk_rows": chunk,
              "fwd_chunk_rows": chunk}
    for key, want in cache.wanted():
        cache.put_entry({"version": 1, "pattern": want["pattern"], "pattern_key": want["pattern_key"],
                         "hidden": want["hidden"], "row_bucket": row_bucket(want["rows"]), "shape": want["shape"],
                         "flags": want["flags"], "dtype": want["dtype"],
                         "kernel": {"kind": "family", "config": config},
                         "winner": {"fwd": "autokernel", "train": "autokernel"}, "times": {}, "raced": False,
                         "producer": {"strategy": "profile"}, "checks": [], "created": time.time()})
        cache.remove_wanted(key)
    cache.close()
    for impl, compiled in (("autokernel", lambda: torch.compile(model, backend="autokernel", options=options)),
                           ("inductor", lambda: torch.compile(model))):
        torch._dynamo.reset()
        train = train_of(compiled())
        print(json.dumps({"in_context": impl, "chunk": chunk, "ms": gpu_ms(train)}), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            train()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x2048x128256,8192x4096x128256")
    p.add_argument("--chunks", default="512,1024,2048,4096")
    p.add_argument("--in-context", type=int, metavar="CHUNK", help="profile the compiled model code instead")
    a = p.parse_args()
    dev = torch.device("cuda")
    if a.in_context:
        n, hid, v = map(int, a.shapes.split(",")[0].split("x"))
        h = torch.randn(n, hid, device=dev, dtype=torch.bfloat16)
        w = torch.randn(v, hid, device=dev, dtype=torch.bfloat16) * hid**-0.5
        profile_in_context(h, w, torch.randint(0, v, (n,), device=dev), a.in_context)
        return
    tflops = matmul_tflops(dev)
    print(f"bf16 matmul 8192^3: {tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in a.shapes.split(","):
        n, hid, v = map(int, shape.split("x"))
        torch.manual_seed(0)
        h = torch.randn(n, hid, device=dev, dtype=torch.bfloat16)
        w = torch.randn(v, hid, device=dev, dtype=torch.bfloat16) * hid**-0.5
        y = torch.randint(0, v, (n,), device=dev)
        floor = 3 * 2 * n * hid * v / (tflops * 1e12) * 1e3
        for chunk in map(int, a.chunks.split(",")):
            rows.append(dict(shape=shape, impl=f"autokernel chunk {chunk}", floor_ms=floor,
                             **profile_chunk(h, w, y, chunk)))
            print(json.dumps(rows[-1]), flush=True)
        for impl, ms in profile_peers(h, w, y).items():
            rows.append(dict(shape=shape, impl=impl, floor_ms=floor, **({"ms": ms} if isinstance(ms, float)
                                                                         else {"error": ms})))
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    parts = ("ms", "mm_fwd", "mm_fwd_t", "ce", "mm_dx", "mm_dx_t", "mm_dw", "mm_dw_t", "mm_dw_fresh", "floor_ms")
    print("\n| shape | impl | " + " | ".join(parts) + " |\n|---|---|" + "---|" * len(parts))
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in parts]
        print(f"| {r['shape']} | {r['impl']} | " + " | ".join(cells) + " |")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "profile_linear_ce.json"), "w") as f:
        json.dump(dict(tflops=tflops, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
