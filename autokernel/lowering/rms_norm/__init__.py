"""RMSNorm: matcher (``match``), custom ops (``ops``), Triton kernels (``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.pattern import Instance, node_val
from autokernel.lowering.rms_norm import ops
from autokernel.lowering.rms_norm.match import find_instances


def _pattern_key(inst: Instance) -> str:
    p = inst.params
    w = inst.inputs["weight"]
    return ops.pattern_key(p["mode"], p["offset"], node_val(inst.inputs["x"]).dtype,
                           node_val(w).dtype if w is not None else None, p["out_dtype"], "residual" in inst.inputs)


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    scalars = (p["eps"], p["offset"], p["mode"], p["out_dtype"], cache_dir)
    suffix = inline_suffix(inputs)
    ak = torch.ops.autokernel
    if "residual" in inst.inputs:  # add + RMSNorm: (y, h[, rstd])
        args = (inputs["x"], inputs["residual"], inputs["weight"], *scalars)
        op = getattr(ak, f"add_rms_norm_train{suffix}" if train else f"add_rms_norm{suffix}")
        return Replacement(op.default, args, 0, {"h": 1})
    args = (inputs["x"], inputs["weight"], *scalars)
    if train:
        return Replacement(getattr(ak, f"rms_norm_train{suffix}").default, args, 0)
    return Replacement(getattr(ak, f"rms_norm{suffix}").default, args, None)


def _problem(*args, **kwargs):
    from autokernel.lowering.rms_norm.problem import RmsNormProblem

    return RmsNormProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
