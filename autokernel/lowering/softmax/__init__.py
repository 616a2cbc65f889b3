"""Softmax and log-softmax over the last dim: matcher (``match``), custom ops (``ops``), Triton kernels
(``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.pattern import Instance, node_val
from autokernel.lowering.softmax import ops
from autokernel.lowering.softmax.match import find_instances


def _pattern_key(inst: Instance) -> str:
    return ops.pattern_key(inst.params["log"], node_val(inst.inputs["x"]).dtype, inst.params["out_dtype"])


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    args = (inputs["x"], p["log"], p["out_dtype"], cache_dir)
    suffix = inline_suffix(inputs)
    name = "softmax_train" if train else "softmax"
    return Replacement(getattr(torch.ops.autokernel, f"{name}{suffix}").default, args, None)


def _problem(*args, **kwargs):
    from autokernel.lowering.softmax.problem import SoftmaxProblem

    return SoftmaxProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
