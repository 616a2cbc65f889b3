"""Finding softmax and log-softmax over the last dim in the aten analysis graph, however the model spells it.

The spellings below all reach a few aten ops; each is one alternative of the pattern:

- ``F.softmax(x, -1)``, ``x.softmax(-1)``, ``torch.softmax(x, dim=-1)``, ``nn.Softmax(-1)``,
  ``dim=x.dim() - 1``                                          -> ``_softmax(x, dim, False)``
- ``F.log_softmax`` / ``x.log_softmax``                         -> ``_log_softmax(x, dim, False)``
- HF eager attention ``F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)`` -> ``_to_copy``,
  ``_softmax``, ``_to_copy``: both casts go into the kernel (it computes in float32 anyway; the output
  dtype is a parameter). CUDA builds may spell a half input with ``dtype=float32`` as
  ``_softmax(x, dim, True)`` (half_to_float).
- by hand: ``e = exp(x - x.amax(-1, keepdim=True)); e / e.sum(-1, keepdim=True)``, also with
  ``x.max(-1, keepdim=True).values``, with or without an upcast of ``x`` and a cast of the result;
  log-softmax as ``h - h.logsumexp(-1, keepdim=True)`` computed in float32 (in half precision eager rounds
  the logsumexp before the subtraction, and that is declined).

A softmax after a mask add or a scale is found too: its input is then the add's (or mul's) output, which
stays with Inductor. The checker declines (never rewrites) what differs in math: a softmax over another
dim, a hand-written form whose max and sum run over different dims, a max or sum without keepdim, a
half-precision logsumexp, intermediates that other code reads.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from autokernel.lowering.pattern import (
    Alt,
    Const,
    Instance,
    Op,
    Var,
    aten,
    cast,
    cast_dtype,
    decline,
    dtype_name,
    find_all,
    node_val,
)
from autokernel.lowering.softmax.ops import OPS, PATTERN

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

X = Var("x")
H = Alt((cast(X, name="upcast"), X))
ROW_MAX = Alt((
    Op((aten.amax,), (H,), name="max"),
    Op((operator.getitem,), (Op((aten.max,), (H,), name="max"), Const("max_index"))),
))
EXP = Op((aten.exp,), (Op((aten.sub,), (H, ROW_MAX), name="shift"),), name="exp")
CORE = Alt((
    Op((aten._softmax, aten._log_softmax), (H, Var("dim")), name="softmax"),
    Op((aten.div,), (EXP, Op((aten.sum,), (EXP,), name="sum")), name="div"),
    Op((aten.sub,), (H, Op((aten.logsumexp,), (H,), name="lse")), name="lse_sub"),
))
SOFTMAX = Alt((cast(CORE, name="outcast"), CORE))


def _dims(node: Node) -> list | None:
    """The reduction dims of an amax / max.dim / sum node, read off its args or kwargs; None for all dims."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    return list(dims) if isinstance(dims, (list, tuple)) else [dims]


def _keepdim(node: Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _is_last(dims: list, rank: int) -> bool:
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % max(rank, 1) == rank - 1


def _check(root: Node, b) -> Instance:
    x = b["x"]
    xv, outv = node_val(x), node_val(root)
    softmax, lse = b.get("softmax"), b.get("lse")
    log = lse is not None or (softmax is not None and softmax.target.overloadpacket is aten._log_softmax)
    inst = Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"x": x},
        params={"log": log, "out_dtype": getattr(outv, "dtype", None)},
        flags={"op": OPS[log], "out": dtype_name(outv.dtype) if isinstance(outv, torch.Tensor) else "?"},
        dtype=dtype_name(xv.dtype) if isinstance(xv, torch.Tensor) else "?",
        shape=tuple(xv.shape) if isinstance(xv, torch.Tensor) else (), requires_grad=False,
    )
    if not isinstance(xv, torch.Tensor) or xv.dim() < 1:
        return decline(inst, "input is not a tensor of rank >= 1")
    if xv.dtype not in FLOATS:
        return decline(inst, f"input dtype {xv.dtype} (supported: fp32, fp16, bf16)")
    if outv.dtype not in FLOATS:
        return decline(inst, f"output dtype {outv.dtype} (supported: fp32, fp16, bf16)")
    rank = xv.dim()
    if softmax is not None:
        if not _is_last([b["dim"]], rank):
            return decline(inst, f"softmax over dim {b['dim']}, not the last dim")
    elif lse is not None:
        dims = _dims(lse)
        if dims is None or not _is_last(dims, rank):
            return decline(inst, f"logsumexp over dim {dims if dims is not None else 'all'}, not the last dim")
        if not _keepdim(lse):
            return decline(inst, "logsumexp without keepdim")
        if b["lse_sub"].kwargs.get("alpha", 1) != 1:
            return decline(inst, f"subtracts {b['lse_sub'].kwargs['alpha']} times the logsumexp")
        if node_val(lse).dtype != torch.float32:
            # Eager rounds the logsumexp to this dtype before subtracting it; the kernel would not.
            return decline(inst, f"subtracts a {dtype_name(node_val(lse).dtype)} logsumexp, not an fp32 one")
    else:
        row_max, row_sum = b["max"], b["sum"]
        if b.get("max_index", 0) != 0:
            return decline(inst, "subtracts the argmax, not the max")
        max_dims, sum_dims = _dims(row_max), _dims(row_sum)
        if max_dims is None or sum_dims is None:
            return decline(inst, "max or sum over all dims")
        if not all(isinstance(d, int) for d in max_dims + sum_dims):
            return decline(inst, "max or sum over a dim that is not a constant")
        if [d % rank for d in max_dims] != [d % rank for d in sum_dims]:
            return decline(inst, f"max over dim {max_dims} but sum over dim {sum_dims}")
        if not _is_last(max_dims, rank):
            return decline(inst, f"softmax over dim {max_dims}, not the last dim")
        if not (_keepdim(row_max) and _keepdim(row_sum)):
            return decline(inst, "max or sum without keepdim")
        if row_sum.kwargs.get("dtype") is not None:
            return decline(inst, "sum with an explicit dtype")
        if b["shift"].kwargs.get("alpha", 1) != 1:
            return decline(inst, f"subtracts {b['shift'].kwargs['alpha']} times the max")
        if b["div"].kwargs.get("rounding_mode") is not None:
            return decline(inst, f"divides with rounding mode {b['div'].kwargs['rounding_mode']!r}")
    upcast = b.get("upcast")
    # The kernel computes in float32: an upcast to it is what the kernel does anyway; any other conversion
    # of the input (a downcast rounds x) stays outside, with x its output.
    if upcast is not None and cast_dtype(upcast) != torch.float32:
        return decline(inst, f"converts the input to {dtype_name(cast_dtype(upcast))} before the softmax, not to fp32")
    outcast = b.get("outcast")
    if outcast is not None:
        if cast_dtype(outcast) is None:
            return decline(inst, "output conversion changes more than the dtype")
        core_dtype = node_val(outcast.args[0]).dtype
        if core_dtype != torch.float32:
            # Absorbing the cast would skip the rounding to ``core_dtype`` in between.
            return decline(inst, f"casts a {dtype_name(core_dtype)} softmax, which the kernel would not round")
    inst.status = "miss"
    return inst


def find_instances(graph: Graph) -> list[Instance]:
    """Every softmax over the last dim in ``graph`` (outermost spelling first), accepted or declined."""
    return find_all(graph, ((SOFTMAX, _check),))
