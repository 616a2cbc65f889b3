"""Gated MLP activation (SwiGLU, GeGLU): matcher (``match``), custom ops (``ops``), Triton kernels
(``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.pattern import Instance, node_val
from autokernel.lowering.swiglu import ops
from autokernel.lowering.swiglu.match import find_instances


def _x(inst: Instance):
    return inst.inputs["x"] if inst.params["layout"] != "separate" else inst.inputs["gate"]


def _pattern_key(inst: Instance) -> str:
    return ops.pattern_key(inst.params["act"], inst.params["layout"], node_val(_x(inst)).dtype)


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    if p["layout"] == "separate":
        args = (inputs["gate"], inputs["up"], p["act"], p["layout"], cache_dir)
    else:
        args = (inputs["x"], None, p["act"], p["layout"], cache_dir)
    suffix = inline_suffix(inputs)
    name = "swiglu_train" if train else "swiglu"
    return Replacement(getattr(torch.ops.autokernel, f"{name}{suffix}").default, args, None)


def _problem(*args, **kwargs):
    from autokernel.lowering.swiglu.problem import SwigluProblem

    return SwigluProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
