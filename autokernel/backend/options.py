"""``torch.compile(..., mode=..., options=...)`` as the autokernel backend receives them.

Keys starting with ``autokernel.`` are ours; every other key is an Inductor config patch and is passed
to ``compile_fx(config_patches=...)``. ``mode`` is translated with ``torch._inductor.list_mode_options``.
Unknown keys are errors that name the key: a typo must not be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autokernel.cache import default_cache_dir

COMPILERS = ("inductor", "aot_eager")


@dataclass
class Options:
    enabled: bool = True
    cache_dir: str = ""
    # "aot_eager" runs the rewritten graph through AOTAutograd without Inductor: a debugging aid that
    # tells our kernels' problems from Inductor's (and keeps the CPU tests fast).
    compiler: str = "inductor"
    record_misses: bool = True
    # SDPA calls whose attn_mask is a compile-time constant equal to the causal mask (or to no mask) get
    # is_causal=True (or no mask) instead: see backend/attention_mask.py.
    attention_masks: bool = True
    inductor: dict[str, Any] = field(default_factory=dict)


_OURS: dict[str, type] = {"enabled": bool, "cache_dir": str, "compiler": str, "record_misses": bool,
                          "attention_masks": bool}


def parse_options(mode: str | None = None, options: dict[str, Any] | None = None,
                  **unexpected: Any) -> Options:
    if unexpected:
        raise TypeError(f"autokernel backend: unexpected keyword argument(s) {sorted(unexpected)}; "
                        "torch.compile passes only mode= and options=")
    import torch._inductor
    import torch._inductor.config as inductor_config

    out = Options(cache_dir=str(default_cache_dir()))
    if mode is not None and mode != "default":
        try:
            out.inductor.update(torch._inductor.list_mode_options(mode))
        except RuntimeError as exc:
            raise ValueError(f"autokernel backend: unknown mode {mode!r}: {exc}") from None
    if options is None:
        return out
    if not isinstance(options, dict):
        raise TypeError(f"autokernel backend: options must be a dict, got {type(options).__name__}")
    known = inductor_config.get_config_copy()
    for key, value in options.items():
        if not isinstance(key, str):
            raise TypeError(f"autokernel backend: option keys are strings, got {key!r}")
        if key.startswith("autokernel."):
            name = key[len("autokernel."):]
            if name not in _OURS:
                raise ValueError(f"autokernel backend: unknown option {key!r}; known: "
                                 f"{sorted('autokernel.' + k for k in _OURS)}")
            if not isinstance(value, _OURS[name]) or (isinstance(value, bool) and _OURS[name] is not bool):
                raise TypeError(f"autokernel backend: option {key!r} must be a {_OURS[name].__name__}, "
                                f"got {value!r}")
            if name == "compiler" and value not in COMPILERS:
                raise ValueError(f"autokernel backend: option {key!r} must be one of {COMPILERS}, got {value!r}")
            setattr(out, name, value)
        elif key in known:
            out.inductor[key] = value
        else:
            raise ValueError(f"autokernel backend: unknown option {key!r}: neither 'autokernel.*' "
                             "nor an Inductor config key (see torch._inductor.list_options())")
    return out
