"""Rotary position embedding (RoPE) on q and k: matcher (``match``), custom ops (``ops``), Triton kernels
(``kernels``), tuning problem (``problem``)."""

from __future__ import annotations

import re

import torch
from torch.fx import Node

from autokernel.lowering import PatternFamily, Replacement, inline_suffix
from autokernel.lowering.pattern import Instance, node_val, size_hint
from autokernel.lowering.rope import ops
from autokernel.lowering.rope.match import find_instances


def _pattern_key(inst: Instance) -> str:
    p, f = inst.params, inst.flags
    q, cos = node_val(inst.inputs["q"]), node_val(inst.inputs["cos"])
    return ops.pattern_key(p["layout"], p["rotary_dim"], size_hint(inst.shape[-1]), f["heads"], f["kv_heads"],
                           q.dtype, cos.dtype, p["out_dtype"])


# SDPA's fused kernels as the analysis view shows them (flash, memory-efficient, cuDNN, the CPU's flash): they read
# q and k through any strides with the last dim unit-strided. Not the math fallback, which runs matmuls.
_STRIDED_READERS = re.compile(r"aten\._scaled_dot_product_(flash|efficient|cudnn|fused)\w*attention")


def _keeps_layout(output: Node | None) -> bool:
    """Whether ``output`` (an aten node of the match) should keep its input's layout: every reader takes any
    strides (SDPA's fused kernels) or is the graph's output, which Inductor returns in eager's layout (for this
    elementwise math, the input's) and would otherwise copy into it."""
    return (output is not None and bool(output.users)
            and all(u.op == "output" or _STRIDED_READERS.match(str(u.target)) for u in output.users))


def _replacement(inst: Instance, inputs, cache_dir: str, train: bool) -> Replacement:
    p = inst.params
    # Each output keeps its input's layout (a transposed [B, S, H, D] view, as models pass q and k) where SDPA reads
    # it, and is contiguous otherwise: eager attention's matmul would copy a transposed q (seen in the CPU graphs
    # of tests/test_inline_graphs.py, GPT-NeoX with eager attention).
    keep_q, keep_k = _keeps_layout(inst.root), _keeps_layout(inst.side_outputs.get("k"))
    args = (inputs["q"], inputs["k"], inputs["cos"], inputs["sin"], p["layout"], p["rotary_dim"], p["out_dtype"],
            keep_q, keep_k, cache_dir)
    suffix = inline_suffix(inputs)
    name = "rope_train" if train else "rope"
    side = {"k": 1} if inst.inputs["k"] is not None else {}
    return Replacement(getattr(torch.ops.autokernel, f"{name}{suffix}").default, args, 0, side)


def _problem(*args, **kwargs):
    from autokernel.lowering.rope.problem import RopeProblem

    return RopeProblem(*args, **kwargs)


FAMILY = PatternFamily(ops.PATTERN, find_instances, _pattern_key, _replacement, _problem)
