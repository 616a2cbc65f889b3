"""Serve a bundle tuned on one GPU on this one (GPU; issue 5's portability run).

python benchmarks/bundle_portability.py BUNDLE.akc [--out DIR]
Imports BUNDLE into a fresh cache directory, then, for each of LayerNorm 8192x4096, RMSNorm 8192x4096 and softmax
8192x8192 (bf16, the shapes the benchmarks tune), prints what ``autokernel.explain`` says of the instance (hit on
the GPU model the bundle was tuned on, a clean miss on another), runs the compiled forward + backward and
compares it with a float32 eager reference, and counts the warnings raised. Writes ``portability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import autokernel


def _rms_norm(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


CASES = {
    "layer_norm": ((8192, 4096), lambda x, w: F.layer_norm(x, (x.shape[-1],), w, None, 1e-5)),
    "rms_norm": ((8192, 4096), _rms_norm),
    "softmax": ((8192, 8192), lambda x, w: torch.softmax(x * w, dim=-1)),
}


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
    rows = []
    for name, ((n, h), fn) in CASES.items():
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(h, device="cuda", dtype=torch.bfloat16)).requires_grad_()
        report = autokernel.explain(fn, x, w, options=options)
        statuses = sorted(f"{i.pattern}:{i.status}" for i in report.instances)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="autokernel", options=options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x, w)
            y.backward(torch.ones_like(y))
        ref = fn(x.detach().float(), w.detach().float())
        err = (y.float() - ref).abs().max().item()
        rows.append({"case": name, "shape": f"{n}x{h}", "instances": statuses, "max_abs_err_fwd": err,
                     "warnings": [str(c.message)[:200] for c in caught]})
        print(f"{name} {n}x{h}: {statuses}; fwd max |err| vs fp32 {err:.3g}; {len(caught)} warning(s)")
        torch._dynamo.reset()
    Path(a.out, "portability.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                           "bundle": a.bundle, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
