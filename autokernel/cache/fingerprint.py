"""Which machine a cache namespace belongs to.

Tuned configurations are only valid on the GPU model, and with the compiler stack, they were tuned
on: the fingerprint names the device (name, SM count, compute capability) and the torch and triton
versions, so a cache copied to the same kind of machine hits and any other machine misses cleanly.
CPU tensors run kernels only under ``TRITON_INTERPRET=1`` (the tests), which is its own namespace.
"""

from __future__ import annotations

import functools
import os
import re

import torch
import triton


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _fingerprint(device_type: str, index: int | None) -> str:
    versions = f"torch{torch.__version__.split('+')[0]}-triton{triton.__version__}"
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        name = f"{props.name}-sm{props.multi_processor_count}-cc{props.major}{props.minor}"
    else:
        name = f"{device_type}-interpret"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{name}-{versions}")


def fingerprint(device: torch.device | str) -> str:
    """The cache namespace of ``device``; e.g. ``NVIDIA_H100_80GB_HBM3-sm132-cc90-torch2.11.0-triton3.6.0``."""
    device = torch.device(device)
    return _fingerprint(device.type, device.index)


def default_device() -> torch.device:
    """The device ``ak-tune`` and ``ak-cache`` work for: the current GPU, else the CPU (interpreter)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def kernels_can_run_on(device: torch.device) -> bool:
    """Our Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
