"""Small helpers the families' launch wrappers share: row views, block sizes, the SM count."""

from __future__ import annotations

import functools

import torch


def next_power_of_2(n: int) -> int:
    # Plain Python: triton.next_power_of_2 is a jit-wrapped helper costing microseconds per call here.
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the size of a persistent grid."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # CPU (the Triton interpreter): a small fixed count so the persistent loops are still exercised.
    return 4


def as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """View ``t`` as ``[rows, hidden]`` with unit column stride (row stride free)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, hidden)
