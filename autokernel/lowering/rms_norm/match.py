"""Finding RMSNorm in the aten analysis graph, however the model spells it.

The spellings below all reach the same few aten ops; each is one alternative of the pattern:

- HF Llama/Mistral/Qwen2: ``h = x.to(float32); h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps);
  weight * h.to(dtype)``                                                   -> mode ``llama``
- Gemma: ``(h * (1.0 + weight.float())).type_as(x)``                       -> mode ``gemma``, offset 1
- gpt-fast: ``x * x`` for the square, ``.type_as(x)``, weight last           -> mode ``llama``
- ``F.rms_norm`` / ``nn.RMSNorm`` (decomposed: weight multiplied in float32) -> mode ``gemma``;
  on CUDA the single op ``aten._fused_rms_norm``
- no weight; operands commuted; ``h / sqrt(v + eps)``; eps a literal or a module attribute.
- float32 inputs: the casts are no-ops the graph does not hold, so every spelling reads as mode ``gemma`` (the
  weight multiplied in float32), which in float32 is the same arithmetic as ``llama``'s.
- any of these applied to ``h = x + residual`` where ``h`` is read elsewhere too: add + RMSNorm, one
  op that also returns ``h`` (flag ``residual``).

The checker declines (never rewrites) what differs in math: a mean over another dim, a sum where a
mean belongs, a power other than 2, a weight that is not one value per channel, intermediates that
other code reads.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
from autokernel.lowering.rms_norm.ops import PATTERN

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

X = Var("x")
H = Alt((cast(X, name="upcast"), X))
SQUARE = Alt((Op((aten.pow,), (H, Const("power"))), Op((aten.mul,), (H, H))))
MEAN = Op((aten.mean, aten.sum), (SQUARE,), name="mean")
VAR_EPS = Op((aten.add, aten.add_), (MEAN, Const("eps")), commutative=True)
RSTD = Alt((
    Op((aten.rsqrt,), (VAR_EPS,)),
    Op((aten.reciprocal,), (Op((aten.sqrt,), (VAR_EPS,)),)),
))
NORM = Alt((
    Op((aten.mul,), (H, RSTD), name="norm", commutative=True),
    Op((aten.div,), (H, Op((aten.sqrt,), (VAR_EPS,))), name="norm"),
))
W_PLAIN = Alt((cast(Var("w"), name="wcast"), Var("w")))
WEIGHT = Alt((
    Op((aten.add,), (W_PLAIN, Const("offset")), name="offset_add", commutative=True),
    W_PLAIN,
))
RMS_NORM = Alt((
    # weight * n.to(dtype) (Llama), n.type_as(x) * weight (gpt-fast), weight * n (float32 models)
    Op((aten.mul,), (WEIGHT, Alt((cast(NORM, name="midcast"), NORM))), name="wmul", commutative=True),
    # (n * (1 + weight.float())).type_as(x) (Gemma), F.rms_norm's decomposition
    cast(Op((aten.mul,), (NORM, WEIGHT), name="wmul", commutative=True), name="outcast"),
    cast(NORM, name="outcast"),
    NORM,
))
# Single-op spellings, where a backend keeps them whole (CUDA builds may): ``_fused_rms_norm`` returns
# (y, rstd); ``rms_norm`` returns y.
FUSED = Alt((
    Op((operator.getitem,), (Op((aten._fused_rms_norm,), (X, Var("normalized_shape"), Var("w")), name="fused"),
                             Const("index"))),
    Op((aten.rms_norm,), (X, Var("normalized_shape"), Var("w")), name="fused"),
))


def _last_dim(dims, rank: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % max(rank, 1) == rank - 1


def _instance(root: Node, b, x: Node, w: Node | None, eps, offset: float, mode: str) -> Instance:
    xv, outv = node_val(x), node_val(root)
    return Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"x": x, "weight": w},
        params={"eps": float(eps), "offset": float(offset), "mode": mode, "out_dtype": outv.dtype},
        flags={"mode": mode, "offset": float(offset),
               "weight": dtype_name(node_val(w).dtype) if w is not None else "none",
               "out": dtype_name(outv.dtype)},
        dtype=dtype_name(xv.dtype), shape=tuple(xv.shape), requires_grad=False,
    )


def _check_common(inst: Instance, x: Node, w: Node | None) -> Instance:
    xv = node_val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() < 1:
        return decline(inst, "input is not a tensor of rank >= 1")
    if xv.dtype not in FLOATS:
        return decline(inst, f"input dtype {xv.dtype} (supported: fp32, fp16, bf16)")
    if inst.params["out_dtype"] not in FLOATS:
        return decline(inst, f"output dtype {inst.params['out_dtype']} (supported: fp32, fp16, bf16)")
    if w is not None:
        wv = node_val(w)
        if not isinstance(wv, torch.Tensor) or wv.dim() != 1:
            return decline(inst, "multiplier is not a 1-D per-channel weight")
        if wv.dtype not in FLOATS:
            return decline(inst, f"weight dtype {wv.dtype}")
        # statically_known_true: comparing symbolic sizes with == would install a guard.
        if not statically_known_true(wv.shape[0] == xv.shape[-1]):
            return decline(inst, f"weight of size {wv.shape[0]} for rows of {xv.shape[-1]}")
    inst.status = "miss"
    return inst


def _check(root: Node, b) -> Instance:
    x = b["x"]
    w = b.get("w")
    mean = b["mean"]
    offset_add = b.get("offset_add")
    offset = b.get("offset", 0.0) if offset_add is not None else 0.0
    mode = "llama" if b.get("midcast") is not None else "gemma"
    inst = _instance(root, b, x, w, b["eps"], offset, mode)
    sq = mean.args[0]
    rank = node_val(sq).dim()
    if mean.target.overloadpacket is aten.sum:
        return decline(inst, "sums the squares instead of averaging them")
    if len(mean.args) < 2 or not _last_dim(mean.args[1], rank):
        dims = mean.args[1] if len(mean.args) > 1 else "all"
        return decline(inst, f"mean over dim {dims}, not the last dim")
    if not (len(mean.args) > 2 and mean.args[2]) and not mean.kwargs.get("keepdim"):
        return decline(inst, "mean without keepdim")
    if mean.kwargs.get("dtype") is not None:
        return decline(inst, "mean with an explicit dtype")
    if "power" in b.values and b["power"] != 2:
        return decline(inst, f"power {b['power']}, not 2")
    if b["eps"] < 0:
        return decline(inst, f"negative eps {b['eps']}")
    xv = node_val(x)
    upcast = b.get("upcast")
    if upcast is not None and cast_dtype(upcast) not in (torch.float32, xv.dtype):
        return decline(inst, f"computes in {cast_dtype(upcast)}, not float32")
    midcast = b.get("midcast")
    if midcast is not None and cast_dtype(midcast) != xv.dtype:
        return decline(inst, f"casts the normalized value to {cast_dtype(midcast)}, not the input dtype")
    if b.get("outcast") is not None and cast_dtype(b["outcast"]) is None:
        return decline(inst, "output conversion changes more than the dtype")
    if b.get("wcast") is not None and cast_dtype(b["wcast"]) not in FLOATS:
        return decline(inst, "weight conversion changes more than the dtype")
    return _check_common(inst, x, w)


def _check_fused(root: Node, b) -> Instance:
    fused = b["fused"]
    eps = fused.args[3] if len(fused.args) > 3 else fused.kwargs.get("eps")
    x, w = b["x"], b["w"]
    xv = node_val(x)
    if eps is None and isinstance(xv, torch.Tensor):
        eps = torch.finfo(xv.dtype).eps
    inst = _instance(root, b, x, w, eps if eps is not None else 0.0, 0.0, "gemma")
    if b.get("index", 0) != 0:
        return decline(inst, "uses rstd of the fused op")
    if len(b["normalized_shape"]) != 1:
        return decline(inst, "normalizes over several trailing dims")
    return _check_common(inst, x, w)


def _absorb_residual_add(inst: Instance, claimed: set[Node]) -> None:
    """Add + RMSNorm: when ``x`` is ``a + b`` of two tensors of its shape and dtype and the sum is read
    elsewhere too (the residual stream of a pre-norm block), the op takes ``a`` and ``b``, computes the
    sum itself and returns it as side output ``h``: one pass over the rows instead of two, and in the
    backward the gradient ``h`` gets from its other readers is added in the same pass. When the norm is
    the sum's only reader, nothing is gained (the backward would get a zero gradient for ``h`` to read)
    and the add stays Inductor's."""
    x = inst.inputs["x"]
    if x.op != "call_function" or x.target is not aten.add.Tensor or x in claimed or x.kwargs.get("alpha", 1) != 1:
        return
    if len(x.args) != 2 or not all(isinstance(a, Node) for a in x.args):
        return
    xv = node_val(x)
    for a in x.args:
        av = node_val(a)
        if not isinstance(av, torch.Tensor) or av.dtype != xv.dtype or av.dim() != xv.dim():
            return
        if not all(statically_known_true(p == q) for p, q in zip(av.shape, xv.shape, strict=True)):
            return
    inside = set(inst.nodes)
    if not any(u not in inside for u in x.users):
        return
    a, b = x.args
    inst.nodes = (*inst.nodes, x)
    inst.inputs = {"x": a, "residual": b, "weight": inst.inputs["weight"]}
    inst.side_outputs = {"h": x}
    inst.flags["residual"] = True


def find_instances(graph: Graph) -> list[Instance]:
    """Every RMSNorm in ``graph`` (outermost spelling first), accepted or declined with a reason."""
    return find_all(graph, ((RMS_NORM, _check), (FUSED, _check_fused)), on_accept=_absorb_residual_add)
