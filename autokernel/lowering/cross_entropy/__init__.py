"""Cross-entropy over class indices: matcher (``match``), custom ops (``ops``), Triton kernels (``kernels``),
tuning problem (``problem``)."""

from __future__ import annotations

import torch

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.cross_entropy import ops
from autokernel.lowering.cross_entropy.match import find_instances
from autokernel.lowering.pattern import Instance, node_val


def _pattern_key(inst: Instance) -> str:
    p = inst.params
    return ops.pattern_key(p["reduction"], p["ignore_index"], p["label_smoothing"],
                           node_val(inst.inputs["logits"]).dtype, p["out_dtype"])


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    args = (inputs["logits"], inputs["labels"], p["ignore_index"], p["label_smoothing"], p["reduction"],
            p["out_dtype"], cache_dir)
    suffix = inline_suffix(inputs)
    if train:
        return Replacement(getattr(torch.ops.autokernel, f"cross_entropy_train{suffix}").default, args, 0)
    return Replacement(getattr(torch.ops.autokernel, f"cross_entropy{suffix}").default, args, None)


def _problem(*args, **kwargs):
    from autokernel.lowering.cross_entropy.problem import CrossEntropyProblem

    return CrossEntropyProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
