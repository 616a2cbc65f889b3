"""Small helpers the families' launch wrappers share: row views, block sizes, the SM count."""

from __future__ import annotations

import functools
from dataclasses import asdict, fields
from typing import Any, TypeVar

import torch

VALID_WARPS = (1, 2, 4, 8, 16, 32)

_Config = TypeVar("_Config", bound="KernelConfig")


class KernelConfig:
    """Base of the families' frozen config dataclasses: the dict round trip the cache stores, and the
    checks every family's ``__post_init__`` makes. Errors name the class and the field."""

    def _check_common(self, warps: tuple[str, ...], positive: tuple[str, ...] = ()) -> None:
        name = type(self).__name__
        for f in fields(self):
            v = getattr(self, f.name)
            # bool is an int subclass; True as a warp count is a bug, not a 1.
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name}.{f.name} must be an int, got {type(v).__name__} {v!r}")
        for field in warps:
            if getattr(self, field) not in VALID_WARPS:
                raise ValueError(f"{name}.{field} must be one of {VALID_WARPS}, got {getattr(self, field)}")
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be > 0, got {getattr(self, field)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], d: dict) -> _Config:
        """Build a config from :meth:`to_dict`'s output; missing keys take their defaults.

        Raises ``ValueError`` naming the offending key or value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def is_power_of_two(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


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
