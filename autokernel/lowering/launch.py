"""Small helpers the families' launch wrappers share: row views, block sizes, the SM count, the cache's
choice of configuration with its fallback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, TypeVar

import torch

logger = logging.getLogger("autokernel")

VALID_WARPS = (1, 2, 4, 8, 16, 32)

# Row-wise kernels take their row count unspecialized: Triton would otherwise compile one variant for 1 row,
# one for a multiple of 16 and one for the rest. The row count never sets an address's alignment (the widths
# and strides, which do, stay specialized), so the variants run alike, and sharing one saves a compile per
# row-count class (a decode step's 1 row included) and most of a tuner candidate's check time: measured on
# an H100, checking an RMSNorm candidate's awkward row counts took ~1 s against 0.18 s for its first run.
ROW_COUNT_UNSPECIALIZED = ("n_rows",)

_Config = TypeVar("_Config", bound="KernelConfig")

_LIBRARY = torch.library.Library("autokernel", "FRAGMENT")


class KernelConfig:
    """Base of the families' frozen config dataclasses: the dict round trip the cache stores, and the
    checks every family's ``__post_init__`` makes. Errors name the class and the field."""

    def _check_common(self, warps: tuple[str, ...], positive: tuple[str, ...] = (), chunks: tuple[str, ...] = (),
                      max_chunk: int = 0) -> None:
        """Every field an int; ``warps`` fields valid warp counts, ``positive`` ones > 0, ``chunks`` ones (chunk
        widths) 0 or a power of two up to ``max_chunk``."""
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
        for field in chunks:
            v = getattr(self, field)
            if v < 0 or v & (v - 1) or v > max_chunk:
                raise ValueError(f"{name}.{field} must be 0 or a power of two <= {max_chunk}, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def keys_text(cls) -> str:
        """The config's keys, comma-separated (what the tuning agent is told it may set)."""
        return ", ".join(f.name for f in fields(cls))

    def fit_chunks(self: _Config, hidden: int, names: tuple[str, ...], default_chunk: int,
                   max_block: int) -> _Config:
        """This config with each chunk-width field in ``names`` (0: the whole row in one block, a power of two:
        chunks that wide) valid for rows of ``hidden``: the whole row of a row wider than ``max_block`` ->
        chunks of ``default_chunk``; one chunk covering the row -> the whole row (one read instead of two).
        So a cached config runs on any width."""
        block = next_power_of_2(hidden)
        changes = {}
        for name in names:
            chunk = getattr(self, name)
            if chunk == 0 and block > max_block:
                logger.debug("%s: rows of %d too wide for one block; %s = %d", type(self).__name__, hidden, name,
                             default_chunk)
                changes[name] = default_chunk
            elif chunk >= block:
                changes[name] = 0
        return type(self)(**{**self.to_dict(), **changes}) if changes else self

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
    if device.type == "meta" and torch.cuda.is_available():
        # ak-tune's precompiler runs candidates on meta tensors to compile them for the current GPU: their
        # persistent grids (and so their kernels' integer arguments) must be that GPU's.
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # CPU (the Triton interpreter): a small fixed count so the persistent loops are still exercised.
    return 4


def as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """View ``t`` as ``[rows, hidden]`` with unit column stride (row stride free)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, hidden)


def load_source_kernels(root: str, source: str, names: tuple[str, ...]) -> list[Any]:
    """The kernels named ``names`` that a cache entry's source text defines (loaded under ``root``);
    ValueError naming the ones it lacks."""
    from autokernel.cache.sources import load_source

    module = load_source(root, source)
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise ValueError(f"its source defines no {' or '.join(missing)}")
    return [getattr(module, n) for n in names]


def cached_choice(cache_dir: str, device: torch.device, key: str, hidden: int, rows: int,
                  config_class: type[_Config], load_kernels: Any, default: _Config) -> tuple[_Config, Any]:
    """(config, source kernels or None) of the cache entry for variant ``key`` at this shape, else
    ``(default, None)``. ``load_kernels(cache_dir, source)`` turns a source entry's text into its kernels.
    A bad entry costs the tuned kernel (logged), never the model."""
    from autokernel.cache import runtime

    entry = runtime.lookup(cache_dir, device, key, hidden, rows) if cache_dir else None
    if entry is not None:
        kernel = entry["kernel"]
        try:
            config = config_class.from_dict(kernel.get("config") or {})
            if kernel["kind"] == "family":
                return config, None
            return config, load_kernels(cache_dir, kernel["source"])
        except Exception as exc:
            logger.warning("autokernel: cache entry for %s H=%d is unusable (%s); using the default configuration",
                           key, hidden, exc)
    return default, None


def run_with_fallback(chosen: tuple[Any, Any], run: Callable[[Any, Any], Any], what: str, x: torch.Tensor,
                      fallback: Callable[[], tuple[tuple, Any]]) -> Any:
    """``run(config, kernels)`` with the cache's choice ``chosen``; if that raises (a source kernel that does not
    compile on this GPU, say), log it once (naming pattern ``what`` and ``x``'s shape) and serve this shape with
    the built-in default from now on. ``fallback()`` gives (the run-time memo key of this shape, the built-in
    default): only that path pays for it."""
    config, kernels = chosen
    try:
        return run(config, kernels)
    except Exception as exc:
        from autokernel.cache import runtime  # here, not per call: this runs on every call of an opaque op

        memo_key, default = fallback()
        if kernels is None and config == default:
            raise
        logger.warning("autokernel: the cached %s kernel for %s failed (%s: %s); using the built-in default",
                       what, tuple(x.shape), type(exc).__name__, exc)
        runtime.memo[memo_key] = (default, None)
        return run(default, None)


def define_plain_op(qualname: str, fn: Callable[..., Any], *, inline: bool, fake: Callable[..., Any]) -> Any:
    """Define an op no autograd formula runs through (a forward-only or a backward op), ``qualname``
    (``autokernel::name``) with its schema from ``fn``'s type hints. Inline: ``torch.library.triton_op`` (its
    fake comes from its body). Opaque: ``torch.library.Library`` with ``fake`` for tracing, rather than
    ``torch.library.custom_op``: Inductor calls either alike, but ``custom_op`` wraps every call in its
    autograd and aliasing checks, a host cost that a step without CUDA graphs pays per instance
    (``benchmarks/op_host_cost.py`` on this project's CPU machine: a no-op ~11 against ~4 us a call; RMSNorm's
    forward-only op, its kernel stubbed, 8.3 us against 17-20 as a ``custom_op``).
    Returns the callable op."""
    if inline:
        return torch.library.triton_op(qualname, fn, mutates_args=())
    namespace, name = qualname.split("::")
    if namespace != _LIBRARY.ns:
        raise ValueError(f"define_plain_op defines ops under {_LIBRARY.ns}::, got {qualname!r}")
    _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    return getattr(getattr(torch.ops, namespace), name).default
