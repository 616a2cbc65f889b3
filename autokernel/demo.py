"""The product loop on a tiny Llama-style block: compile -> misses -> ak-tune -> compile -> hits.

    python -m autokernel.demo

Runs anywhere: on a CUDA GPU it tunes for that GPU; without one it uses the Triton interpreter on the
CPU (tiny shapes, timings meaningless, but every step is the real one). The cache goes to a fresh
temporary directory unless ``AUTOKERNEL_CACHE_DIR`` is set.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import torch

import autokernel
from autokernel.cache.fingerprint import interpreter_enabled


class LlamaRMSNorm(torch.nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Block(torch.nn.Module):
    """Pre-norm MLP block and a final norm, as in a Llama decoder (attention left out for brevity)."""

    def __init__(self, hidden: int = 64, intermediate: int = 128):
        super().__init__()
        self.input_norm = LlamaRMSNorm(hidden)
        self.gate = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)
        self.final_norm = torch.nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_norm(x)
        x = x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return self.final_norm(x)


def main() -> int:
    if not torch.cuda.is_available() and not interpreter_enabled():
        # The interpreter must be chosen before triton is first imported (``python -m autokernel.demo``
        # has imported it with the package already): start again with it set.
        os.execve(sys.executable, [sys.executable, "-m", "autokernel.demo"],
                  dict(os.environ, TRITON_INTERPRET="1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    cache_dir = os.environ.get("AUTOKERNEL_CACHE_DIR") or tempfile.mkdtemp(prefix="autokernel-demo-")
    options = {"autokernel.cache_dir": cache_dir}
    torch.manual_seed(0)
    model = Block().to(device, dtype)
    x = torch.randn(2, 8, 64, device=device, dtype=dtype)
    where = "the Triton interpreter (CPU)" if device == "cpu" else torch.cuda.get_device_name()
    print(f"autokernel demo on {where}; cache: {cache_dir}\n")

    print("1. What the backend finds in the block (empty cache: every pattern instance is a miss):")
    print(autokernel.explain(model, x, options=options), "\n")

    print("2. Compile and run: the misses go to Inductor and are recorded in the wanted table.")
    torch.compile(model, backend="autokernel", options=options)(x).sum().backward()
    model.zero_grad()

    print("\n3. ak-tune works through the wanted table:")
    env = dict(os.environ, AUTOKERNEL_CACHE_DIR=cache_dir)
    subprocess.run([sys.executable, "-m", "autokernel.playbook.cli", "--budget", "5"], check=True, env=env)

    torch._dynamo.reset()
    print("\n4. The same model again: now every instance is served by a tuned Triton kernel.")
    report = autokernel.explain(model, x, options=options)
    print(report, "\n")
    compiled = torch.compile(model, backend="autokernel", options=options)
    reference = copy.deepcopy(model).double()
    weights = torch.linspace(-1, 1, x.numel(), device=device).view_as(x)

    def grads(fn, module, inp):
        module.zero_grad()
        inp = inp.clone().requires_grad_(True)
        (fn(inp).double() * weights).sum().backward()
        return [p.grad.double() for p in module.parameters()] + [inp.grad.double()]

    exact = grads(reference, reference, x.double())

    def worst(got):
        return max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact, strict=True))

    err_compiled = worst(grads(compiled, model, x))
    err_eager = worst(grads(model, model, x))
    hits = report.counts().get("hit", 0)
    print(f"5. Compiled with {hits} tuned kernel(s). Largest gradient error against a float64 copy of the model,"
          f" relative to the gradient's magnitude:\n   autokernel {err_compiled:.1e}, eager bf16 {err_eager:.1e}")
    if device == "cpu":
        print("   (the Triton interpreter truncates float32 -> bf16 where a GPU rounds to nearest: about twice the"
              " rounding error of eager here, not on a GPU)")
    return 0 if hits == len(report.instances) and err_compiled < 4 * max(err_eager, 1e-2) else 1


if __name__ == "__main__":
    sys.exit(main())
