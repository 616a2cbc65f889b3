"""No kernel launch of ours makes the host wait for the GPU (marker ``gpu``; run on the device machine:
``pytest -m gpu``). A synchronizing call (``.item()``, a device-to-host copy, a host-to-device copy from pageable
memory) inside an op stalls the step's pipeline: the GPU idles while the host catches up, which the Llama step's
profile shows only as time outside kernels. Each family's forward and training pass runs once to compile its
kernels, then again under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any such call."""

from __future__ import annotations

import pytest
import torch

from autokernel.lowering import families

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]


@pytest.mark.parametrize(("pattern", "flags", "shape"), [
    ("rms_norm", {"mode": "llama"}, [1000, 2048]),
    ("rms_norm", {"mode": "llama", "residual": True}, [1000, 2048]),
    ("rms_norm", {"mode": "llama"}, [64, 40000]),
    ("layer_norm", {}, [1000, 4096]),
    ("softmax", {"op": "log_softmax"}, [1000, 8192]),
    ("swiglu", {}, [1000, 4096]),
    ("cross_entropy", {}, [1000, 32000]),
    ("cross_entropy", {"reduction": "none", "label_smoothing": 0.1}, [1000, 32000]),
    ("linear_cross_entropy", {}, [1000, 512, 32000]),
    ("linear_cross_entropy", {"logits_out": True}, [1000, 512, 32000]),
    ("linear_cross_entropy", {"reduction": "none"}, [1000, 512, 32000]),
    ("rope", {"layout": "half", "kv_heads": 2}, [2, 8, 256, 128]),
], ids=str)
def test_no_host_sync(pattern, flags, shape):
    problem = families()[pattern].problem(flags, "bf16", shape, "cuda")
    config = problem.default_candidate()
    case = problem.case(*problem.target_shape())
    problem.run(config, case)  # compiles the kernels (a first launch may query the device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        problem.run(config, case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
