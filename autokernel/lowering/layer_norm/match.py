"""Finding LayerNorm in the aten analysis graph, however the model spells it.

- ``F.layer_norm`` / ``torch.layer_norm`` / ``nn.LayerNorm`` (with or without weight and bias): one
  ``aten.native_layer_norm`` node (or ``aten.layer_norm``), whose output 0 is read; optionally on an
  upcast input and cast back (``F.layer_norm(x.float(), ...).to(dtype)``)             -> mode ``fp32``
- hand-written: ``mean = h.mean(-1, keepdim=True)``, the biased variance as ``h.var(-1, keepdim=True,
  unbiased=False)`` (``correction=0``) or ``(h - mean).pow(2).mean(-1, keepdim=True)`` (or ``d * d``),
  ``(h - mean) * rsqrt(var + eps)`` or ``/ sqrt(var + eps)``, then ``* w`` and ``+ b`` (either, both, in
  any operand order), with or without ``h = x.float()`` and a cast back               -> mode ``fp32``;
  the normalized value cast back to x's dtype before the affine (``w * n.to(dtype) + b``) -> ``rounded``
- a normalized shape over several trailing dims (``(4, 8)``, or a mean over ``(-2, -1)``): the op
  normalizes rows of their product.

The checker declines (never rewrites) what differs in math: an unbiased variance, a mean or variance over
another dim (or over different dims), a weight or bias that is not one value per normalized element,
intermediates that other code reads (the fused op's mean or rstd, say).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autokernel.lowering.layer_norm.ops import PATTERN
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

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

X = Var("x")
H = Alt((cast(X), X))  # every cast of x in a match is checked in _check_casts
MEAN = Op((aten.mean,), (H,), name="mean")
CENTERED = Op((aten.sub,), (H, MEAN))
VARIANCE = Alt((
    Op((aten.var,), (H,), name="var"),
    Op((aten.mean,), (Alt((Op((aten.pow,), (CENTERED, Const("power"))), Op((aten.mul,), (CENTERED, CENTERED)))),),
       name="varmean"),
))
VAR_EPS = Op((aten.add,), (VARIANCE, Const("eps")), commutative=True)
RSTD = Alt((Op((aten.rsqrt,), (VAR_EPS,)), Op((aten.reciprocal,), (Op((aten.sqrt,), (VAR_EPS,)),))))
NORM = Alt((
    Op((aten.mul,), (CENTERED, RSTD), name="norm", commutative=True),
    Op((aten.div,), (CENTERED, Op((aten.sqrt,), (VAR_EPS,))), name="norm"),
))
MID = Alt((cast(NORM, name="midcast"), NORM))
SCALED = Alt((Op((aten.mul,), (MID, Alt((cast(Var("w"), name="wcast"), Var("w")))), name="wmul", commutative=True),
              MID))
AFFINE = Alt((Op((aten.add,), (SCALED, Alt((cast(Var("b"), name="bcast"), Var("b")))), name="badd",
                 commutative=True),
              SCALED))
LAYER_NORM = Alt((cast(AFFINE, name="outcast"), AFFINE))

# The single op: ``native_layer_norm`` returns (y, mean, rstd); ``layer_norm`` returns y. Weight, bias and
# eps are read off the node (``layer_norm`` may leave them out).
FUSED_X = Alt((cast(X, name="upcast"), X))
FUSED_CORE = Alt((
    Op((operator.getitem,), (Op((aten.native_layer_norm,), (FUSED_X, Var("normalized_shape")), name="fused"),
                             Const("index"))),
    Op((aten.layer_norm,), (FUSED_X, Var("normalized_shape")), name="fused"),
))
FUSED = Alt((cast(FUSED_CORE, name="outcast"), FUSED_CORE))


def _instance(root: Node, b, x: Node, w, bias, eps, norm_ndim: int, mode: str) -> Instance:
    xv, outv = node_val(x), node_val(root)
    sizes = tuple(xv.shape) if isinstance(xv, torch.Tensor) else ()
    split = max(len(sizes) - norm_ndim, 0)
    hidden = 1
    for s in sizes[split:]:
        hidden = hidden * s
    flags = {"mode": mode,
             "weight": dtype_name(node_val(w).dtype) if isinstance(node_val(w), torch.Tensor) else "none",
             "bias": dtype_name(node_val(bias).dtype) if isinstance(node_val(bias), torch.Tensor) else "none",
             "out": dtype_name(outv.dtype)}
    # shape: the rows' dims, then the normalized dims flattened into one row width (what the cache keys on)
    return Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"x": x, "weight": w, "bias": bias},
        params={"eps": float(eps), "norm_ndim": norm_ndim, "mode": mode, "out_dtype": outv.dtype},
        flags=flags, dtype=dtype_name(xv.dtype) if isinstance(xv, torch.Tensor) else "?",
        shape=(*sizes[:split], hidden), requires_grad=False,
    )


def _check_common(inst: Instance, x: Node, w, bias) -> Instance:
    xv = node_val(x)
    norm_ndim = inst.params["norm_ndim"]
    if not isinstance(xv, torch.Tensor) or xv.dim() < norm_ndim:
        return decline(inst, f"input is not a tensor of rank >= {norm_ndim}")
    if xv.dtype not in FLOATS:
        return decline(inst, f"input dtype {xv.dtype} (supported: fp32, fp16, bf16)")
    if inst.params["out_dtype"] not in FLOATS:
        return decline(inst, f"output dtype {inst.params['out_dtype']} (supported: fp32, fp16, bf16)")
    if inst.params["eps"] < 0:
        return decline(inst, f"negative eps {inst.params['eps']}")
    norm_shape = xv.shape[xv.dim() - norm_ndim:]
    for name, what, t in (("weight", "multiplier", w), ("bias", "added term", bias)):
        if t is None:
            continue
        tv = node_val(t)
        if not isinstance(tv, torch.Tensor) or tv.dim() != norm_ndim:
            return decline(inst, f"{what} is not a per-channel {name} of the normalized shape")
        if tv.dtype not in FLOATS:
            return decline(inst, f"{name} dtype {tv.dtype}")
        # statically_known_true: comparing symbolic sizes with == would install a guard.
        if not all(statically_known_true(a == n) for a, n in zip(tv.shape, norm_shape, strict=True)):
            return decline(inst, f"{name} of shape {tuple(tv.shape)} for a normalized shape {tuple(norm_shape)}")
    inst.status = "miss"
    return inst


def _trailing_dims(reduction: Node, rank: int) -> int | str:
    """How many trailing dims a keepdim mean/var over ``reduction.args[1]`` covers, or why it is not that."""
    dims = reduction.args[1] if len(reduction.args) > 1 else reduction.kwargs.get("dim")
    if dims is None:
        return "a reduction over all dims"
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims or not all(isinstance(d, int) for d in dims):
        return f"a reduction over dims {dims}"
    norm = sorted({d % rank for d in dims})
    if len(norm) != len(dims) or norm != list(range(rank - len(norm), rank)):
        return f"mean over dim {dims}, not the last dims"
    # mean.dim takes keepdim as its third argument; var.correction only as a keyword
    is_mean = reduction.target.overloadpacket is aten.mean
    keepdim = reduction.args[2] if is_mean and len(reduction.args) > 2 else reduction.kwargs.get("keepdim", False)
    if not keepdim:
        return f"{reduction.target.overloadpacket.__name__} without keepdim"
    if reduction.kwargs.get("dtype") is not None:
        return "mean with an explicit dtype"
    return len(norm)


def _check_casts(b, x: Node, midcast: Node | None) -> str | None:
    """Why the casts (or an add's alpha, a division's rounding) of a match change the math, or None."""
    xv = node_val(x)
    for node in b.nodes:
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            return f"{node.name} scales by alpha or rounds: {dict(node.kwargs)}"
        if node.target is aten._to_copy.default and node.args[0] is x \
                and cast_dtype(node) not in (torch.float32, xv.dtype):
            return f"computes in {cast_dtype(node)}, not float32"
    if midcast is not None and cast_dtype(midcast) != xv.dtype:
        return f"casts the normalized value to {cast_dtype(midcast)}, not the input dtype"
    if b.get("outcast") is not None and cast_dtype(b["outcast"]) is None:
        return "output conversion changes more than the dtype"
    for name in ("wcast", "bcast"):
        if b.get(name) is not None and cast_dtype(b[name]) not in FLOATS:
            return "weight or bias conversion changes more than the dtype"
    return None


def _check(root: Node, b) -> Instance:
    x, mean = b["x"], b["mean"]
    rank = node_val(mean.args[0]).dim()
    w = b.get("w") if b.get("wmul") is not None else None
    bias = b.get("b") if b.get("badd") is not None else None
    # A cast of the normalized value with nothing after it is the output conversion.
    midcast = b.get("midcast")
    if w is None and bias is None and b.get("outcast") is None:
        midcast = None
    rounded = midcast is not None
    ndim = _trailing_dims(mean, rank)
    inst = _instance(root, b, x, w, bias, b["eps"], ndim if isinstance(ndim, int) else 1,
                     "rounded" if rounded else "fp32")
    if isinstance(ndim, str):
        return decline(inst, ndim)
    variance = b["var"] if b.get("var") is not None else b["varmean"]
    vdim = _trailing_dims(variance, rank)
    if vdim != ndim:
        return decline(inst, f"variance over other dims than the mean ({variance.args[1]} vs {mean.args[1]})")
    if b.get("var") is not None:
        correction = variance.kwargs.get("correction", 1)
        if correction is None or correction != 0:
            return decline(inst, f"unbiased variance (correction {1 if correction is None else correction})")
    if b.get("power", 2) != 2:
        return decline(inst, f"power {b['power']}, not 2")
    problem = _check_casts(b, x, midcast)
    if problem:
        return decline(inst, problem)
    return _check_common(inst, x, w, bias)


def _check_fused(root: Node, b) -> Instance:
    fused = b["fused"]
    args = list(fused.args) + [None] * 5
    w = args[2] if args[2] is not None else fused.kwargs.get("weight")
    bias = args[3] if args[3] is not None else fused.kwargs.get("bias")
    eps = args[4] if args[4] is not None else fused.kwargs.get("eps", 1e-5)
    x = b["x"]
    number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    inst = _instance(root, b, x, w, bias, eps if number else 0.0, len(b["normalized_shape"]), "fp32")
    if not number:
        return decline(inst, f"eps {eps!r} is not a number")
    xv = node_val(x)
    if isinstance(xv, torch.Tensor) and not all(
            statically_known_true(a == n) for a, n in
            zip(xv.shape[max(xv.dim() - len(b["normalized_shape"]), 0):], b["normalized_shape"], strict=False)):
        return decline(inst, f"normalized shape {b['normalized_shape']} is not x's trailing shape")
    problem = _check_casts(b, x, None)
    if problem:
        return decline(inst, problem)
    return _check_common(inst, x, w, bias)


def find_instances(graph: Graph) -> list[Instance]:
    """Every LayerNorm in ``graph`` (outermost spelling first), accepted or declined with a reason."""
    # The fused op's mean or rstd output is no LayerNorm; reading it is declined at output 0.
    return find_all(graph, ((LAYER_NORM, _check), (FUSED, _check_fused)), skip=lambda b: b.get("index", 0) != 0)
