"""Linear + cross-entropy (the lm_head matmul and the loss), chunked over rows: matcher (``match``), custom ops
(``ops``), the chunked driver over cuBLAS and the cross_entropy family's kernel (``kernels``), tuning problem
(``problem``)."""

from __future__ import annotations

import torch
from torch.fx import Node

from autokernel.lowering import PatternFamily, Replacement
from autokernel.lowering.linear_cross_entropy import ops
from autokernel.lowering.linear_cross_entropy.match import find_instances
from autokernel.lowering.pattern import Instance, node_val


def _pattern_key(inst: Instance) -> str:
    p, f = inst.params, inst.flags
    return ops.pattern_key(p["reduction"], p["ignore_index"], p["label_smoothing"], node_val(inst.inputs["x"]).dtype,
                           p["out_dtype"], f["bias"], f["vocab"], p["keep_logits"])


def _needs_grad(node: Node | None) -> bool:
    return node is not None and bool(getattr(node.meta.get("example_value"), "requires_grad", False))


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["labels"], p["ignore_index"], p["label_smoothing"],
            p["reduction"], p["out_dtype"], p["keep_logits"])
    side = {"logits": 1} if p["keep_logits"] else {}
    ak = torch.ops.autokernel
    if train:
        # Only the gradients autograd will ask for: a frozen lm_head (or trunk) costs no dW (or dh).
        wants = tuple(_needs_grad(inputs[name]) for name in ("x", "weight", "bias"))
        return Replacement(ak.linear_cross_entropy_train.default, (*args, *wants, cache_dir), 0, side)
    return Replacement(ak.linear_cross_entropy.default, (*args, cache_dir), 0, side)


def _problem(*args, **kwargs):
    from autokernel.lowering.linear_cross_entropy.problem import LinearCrossEntropyProblem

    return LinearCrossEntropyProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
