"""LayerNorm: matcher (``match``), custom ops (``ops``), Triton kernels (``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.layer_norm import ops
from autokernel.lowering.layer_norm.match import find_instances
from autokernel.lowering.pattern import Instance, node_val


def _dtype_of(node) -> torch.dtype | None:
    return node_val(node).dtype if node is not None else None


def _pattern_key(inst: Instance) -> str:
    p = inst.params
    return ops.pattern_key(p["mode"], node_val(inst.inputs["x"]).dtype, _dtype_of(inst.inputs["weight"]),
                           _dtype_of(inst.inputs["bias"]), p["out_dtype"])


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    args = (inputs["x"], inputs["weight"], inputs["bias"], p["eps"], p["norm_ndim"], p["mode"], p["out_dtype"],
            cache_dir)
    suffix = inline_suffix(inputs)
    if train:
        return Replacement(getattr(torch.ops.autokernel, f"layer_norm_train{suffix}").default, args, 0)
    return Replacement(getattr(torch.ops.autokernel, f"layer_norm{suffix}").default, args, None)


def _problem(*args, **kwargs):
    from autokernel.lowering.layer_norm.problem import LayerNormProblem

    return LayerNormProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
