"""Cross-entropy 8192x128256 bf16 (upcast, mean), GPU time (CUDA-graph replay): our forward, our forward + the
backward that recomputes the gradient from the saved (max, log-sum-exp), and Inductor's compiled F.cross_entropy,
with the DRAM floor. GPU only: ``python benchmarks/profile_cross_entropy.py``.
"""
import torch
import torch.nn.functional as F

from autokernel.lowering.cross_entropy.kernels import (
    cross_entropy_bwd,
    cross_entropy_fwd,
    default_config,
)
from autokernel.playbook.timing import copy_gbps, gpu_or_host_ms


def main() -> None:
    dev = torch.device("cuda")
    R, V = 8192, 128256
    x = torch.randn(R, V, device=dev).mul_(2).to(torch.bfloat16)
    y = torch.randint(0, V, (R,), device=dev)
    y[::7] = -100
    d = torch.ones((), device=dev)
    cfg = default_config(V, R, x.dtype)

    def new():
        loss, stats = cross_entropy_fwd(x, y, -100, 0.0, "mean", torch.float32, cfg, True)
        return cross_entropy_bwd(d, x, y, stats, -100, 0.0, "mean", cfg)

    def fwd():
        return cross_entropy_fwd(x, y, -100, 0.0, "mean", torch.float32, cfg, False)

    xr = x.detach().clone().requires_grad_(True)
    comp = torch.compile(lambda a, b: F.cross_entropy(a.float(), b, ignore_index=-100))
    def ind():
        comp(xr, y).backward()
        xr.grad = None

    ref = x.double().requires_grad_(True)
    F.cross_entropy(ref, y, ignore_index=-100).backward()
    print("max |new - ref|", (new().double() - ref.grad).abs().max().item())
    bw = copy_gbps(dev)
    print(f"copy {bw:.0f} GB/s; floor fwd+bwd (read + write 2 GiB bf16) {2 * x.numel() * 2 / (bw * 1e9) * 1e3:.3f} ms")
    for name, fn in [("fwd", fwd), ("new fwd+bwd", new), ("inductor fwd+bwd", ind), ("new fwd+bwd again", new)]:
        ms, clock = gpu_or_host_ms(fn, dev)
        print(f"{name:20s} {ms:.4f} ms ({clock})", flush=True)


if __name__ == "__main__":
    main()
