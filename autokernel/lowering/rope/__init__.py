"""Rotary position embedding (RoPE) on q and k: matcher (``match``), custom ops (``ops``), Triton kernels
(``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.pattern import Instance, node_val, size_hint
from autokernel.lowering.rope import ops
from autokernel.lowering.rope.match import find_instances


def _pattern_key(inst: Instance) -> str:
    p, f = inst.params, inst.flags
    q, cos = node_val(inst.inputs["q"]), node_val(inst.inputs["cos"])
    return ops.pattern_key(p["layout"], p["rotary_dim"], size_hint(inst.shape[-1]), f["heads"], f["kv_heads"],
                           q.dtype, cos.dtype, p["out_dtype"])


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    args = (inputs["q"], inputs["k"], inputs["cos"], inputs["sin"], p["layout"], p["rotary_dim"], p["out_dtype"],
            cache_dir)
    suffix = inline_suffix(inputs)
    name = "rope_train" if train else "rope"
    side = {"k": 1} if inst.inputs["k"] is not None else {}
    return Replacement(getattr(torch.ops.autokernel, f"{name}{suffix}").default, args, 0, side)


def _problem(*args, **kwargs):
    from autokernel.lowering.rope.problem import RopeProblem

    return RopeProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
