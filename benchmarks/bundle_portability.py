"""Serve a bundle tuned on one GPU on this one (GPU; issue 5's portability run).

python benchmarks/bundle_portability.py BUNDLE.akc [--out DIR]
Imports BUNDLE into a fresh cache directory, then, for LayerNorm 8192x4096 with weight and bias (bf16: the shape
and variant ``device_session.sh patterns layer_norm`` tunes), prints what ``autokernel.explain`` says of the
instance (a hit on the GPU model the bundle was tuned on, a clean miss on another), runs the compiled forward +
backward, compares it with a float32 eager reference, and collects autokernel's logged warnings. Writes
``portability.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import autokernel


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="akc-portability-")
    env = {**os.environ, "AUTOKERNEL_CACHE_DIR": cache_dir}
    imported = subprocess.run(["ak-cache", "import", a.bundle], env=env, capture_output=True, text=True, check=True)
    print(imported.stdout.splitlines()[0])
    options = {"autokernel.cache_dir": cache_dir}
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    b = (0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    report = autokernel.explain(layer_norm, x, w, b, options=options)
    print(report)
    torch._dynamo.reset()
    compiled = torch.compile(layer_norm, backend="autokernel", options=options)
    caught: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = caught.append
    logging.getLogger("autokernel").addHandler(handler)
    y = compiled(x, w, b)
    y.backward(torch.ones_like(y))
    err = (y.float() - layer_norm(x.detach().float(), w.detach().float(), b.detach().float())).abs().max().item()
    print(f"forward max |err| vs fp32 eager {err:.3g}; {len(caught)} autokernel warning(s)")
    result = {"device": torch.cuda.get_device_name(), "bundle": a.bundle,
              "instances": [f"{i.pattern}:{i.status}" for i in report.instances], "max_abs_err_fwd": err,
              "autokernel_warnings": [c.getMessage()[:200] for c in caught]}
    Path(a.out, "portability.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
