"""Finding cross-entropy over class indices in the aten analysis graph, however the model spells it.

``F.cross_entropy`` / ``nn.CrossEntropyLoss`` (and ``F.nll_loss(F.log_softmax(x, -1), y)``) reach aten as
``_log_softmax`` + ``nll_loss_forward`` (its output 0); with ``label_smoothing`` the decomposition adds
the smoothing term ``-sum(logp, 1)``, masked at ignored rows and reduced like the loss, and combines
``(1 - e) * nll + (e / C) * smooth``. Absorbed around it: the upcast ``logits.float()`` (before or
after a flattening view) and the flattening ``.view(-1, V)`` of HF's causal-LM loss (the op flattens
itself). Left to the graph, outside the pattern: the label shift, and the ``/ num_items_in_batch`` of
HF's ``reduction="sum"`` (the backward scales by the incoming gradient).

The checker declines (never rewrites) what differs in math: class weights, probabilities as targets,
class dim of a >2-D tensor (``nll_loss2d``), a log-softmax over another dim, a cast to something other
than float32, intermediates (the log-probabilities) that other code reads.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autokernel.lowering.cross_entropy.kernels import LABEL_DTYPES
from autokernel.lowering.cross_entropy.ops import PATTERN
from autokernel.lowering.pattern import (
    DYNAMIC_SCALAR,
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
    graph_input_reason,
    node_val,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
REDUCTION_CODES = {0: "none", 1: "mean", 2: "sum"}  # at::Reduction

X = Var("x")
FLATTEN_OPS = (aten.view, aten._unsafe_view, aten.reshape)
SRC = Alt((
    cast(Op(FLATTEN_OPS, (X, Var("shape")), name="flatten"), name="upcast"),
    Op(FLATTEN_OPS, (cast(X, name="upcast"), Var("shape")), name="flatten"),
    cast(X, name="upcast"),
    Op(FLATTEN_OPS, (X, Var("shape")), name="flatten"),
    X,
))
LOGP = Op((aten._log_softmax, aten.log_softmax), (SRC, Const("dim")), name="logp")
NLL = Op((operator.getitem,), (Op((aten.nll_loss_forward,), (LOGP, Var("labels")), name="nll"), Const("index")))
# The smoothing term of ``cross_entropy(..., label_smoothing=e)``: -sum(logp, class dim), zero at ignored rows,
# reduced as the loss is ('mean' divides by the number of rows not ignored).
IGNORED = Op((aten.eq,), (Var("labels"), Const("smooth_ignore")), name="ignored")
SMOOTH_ROWS = Op((aten.masked_fill, aten.masked_fill_),
                 (Op((aten.neg,), (Op((aten.sum,), (LOGP, Var("smooth_dims")), name="smooth_sum"),)),
                  IGNORED, Const("fill")))
SMOOTH = Alt((
    Op((aten.div,), (Op((aten.sum,), (SMOOTH_ROWS,), name="smooth_total"),
                     Op((aten.sum,), (Op((aten.bitwise_not,), (IGNORED,)),), name="valid_count")), name="smooth_mean"),
    Op((aten.sum,), (SMOOTH_ROWS,), name="smooth_total"),
    SMOOTH_ROWS,
))
SMOOTHED = Op((aten.add,), (Op((aten.mul,), (NLL, Const("nll_coef")), commutative=True),
                            Op((aten.mul,), (SMOOTH, Var("smooth_coef")), commutative=True)),
              name="smoothed", commutative=True)
# Near-misses worth a reason: probabilities as targets (-sum(logp * p) / rows), the class dim of a >2-D
# tensor (nll_loss2d over a view of the log-softmax).
PROBS = Op((aten.neg,), (Op((aten.sum,), (Op((aten.mul,), (LOGP, Var("probs")), commutative=True),)),))
NLL2D = Op((operator.getitem,), (Op((aten.nll_loss2d_forward,), (Op(FLATTEN_OPS, (LOGP, Var("shape2d"))),
                                                                   Var("labels")), name="nll"), Const("index")))


def _instance(root: Node, b, reduction: str, ignore_index: int | Node, smoothing: float) -> Instance:
    x, logp = b["x"], b["logp"]
    # An ignore_index Dynamo made a graph input stays its node: the backend declines the instance, naming it.
    ignore_index = ignore_index if isinstance(ignore_index, Node) else int(ignore_index)
    xv, inner = node_val(x), node_val(logp.args[0])
    out_dtype = node_val(root).dtype if isinstance(node_val(root), torch.Tensor) else torch.float32
    return Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"logits": x, "labels": b.get("labels")},
        params={"reduction": reduction, "ignore_index": ignore_index, "label_smoothing": float(smoothing),
                "out_dtype": out_dtype},
        flags={"reduction": reduction, "ignore_index": ignore_index, "label_smoothing": float(smoothing),
               "upcast": out_dtype != xv.dtype},
        dtype=dtype_name(xv.dtype), shape=tuple(inner.shape), requires_grad=False,
    )


def _check_logp(inst: Instance, b) -> Instance:
    """What every spelling shares: the log-softmax over the class dim of 2-D logits, the casts, the dtypes."""
    x, logp = b["x"], b["logp"]
    xv, inner = node_val(x), node_val(logp.args[0])
    if not isinstance(xv, torch.Tensor) or not isinstance(inner, torch.Tensor):
        return decline(inst, "logits are not a tensor")
    if inner.dim() != 2:
        return decline(inst, f"logits of rank {inner.dim()} (the op takes [rows, classes])")
    if b["dim"] not in (1, -1):
        return decline(inst, f"log-softmax over dim {b['dim']}, not the class dim")
    if logp.target.overloadpacket is aten._log_softmax and len(logp.args) > 2 and logp.args[2]:
        return decline(inst, "log-softmax with half_to_float")
    if logp.kwargs.get("dtype") is not None:
        return decline(inst, "log-softmax with an explicit dtype")
    if xv.dtype not in FLOATS or inner.dtype not in FLOATS:
        return decline(inst, f"logits dtype {inner.dtype} (supported: fp32, fp16, bf16)")
    upcast = b.get("upcast")
    if upcast is not None and cast_dtype(upcast) != torch.float32:
        return decline(inst, f"casts the logits to {cast_dtype(upcast)}, not float32")
    flatten = b.get("flatten")
    if flatten is not None:
        # A flatten of the leading dims only: the class dim must stay the last dim, whole.
        if xv.dim() < 1 or not statically_known_true(xv.shape[-1] == inner.shape[-1]):
            return decline(inst, f"a view of {tuple(xv.shape)} to {tuple(inner.shape)} is not a flatten to rows")
    labels = node_val(b.get("labels"))
    if not isinstance(labels, torch.Tensor) or labels.dtype not in LABEL_DTYPES:
        return decline(inst, "targets are not int64/int32 class indices")
    if labels.dim() != 1:
        return decline(inst, f"labels of rank {labels.dim()}")
    inst.status = "miss"
    return inst


def _nll_args(nll: Node) -> tuple[object, int, int]:
    args = list(nll.args) + [None] * 5
    weight = args[2] if len(nll.args) > 2 else nll.kwargs.get("weight")
    reduction = nll.args[3] if len(nll.args) > 3 else nll.kwargs.get("reduction", 1)
    ignore_index = nll.args[4] if len(nll.args) > 4 else nll.kwargs.get("ignore_index", -100)
    return weight, reduction, ignore_index


def _check_nll(root: Node, b, smoothing: float = 0.0) -> Instance:
    weight, code, ignore_index = _nll_args(b["nll"])
    reduction = REDUCTION_CODES.get(code, "none")
    inst = _instance(root, b, reduction, ignore_index, smoothing)
    if b.get("index", 0) != 0:
        return decline(inst, "uses total_weight of nll_loss_forward")
    if weight is not None:
        return decline(inst, "class weights (weight=)")
    if code not in REDUCTION_CODES:
        return decline(inst, f"unknown reduction code {code}")
    return _check_logp(inst, b)


def _check_smoothed(root: Node, b) -> Instance:
    logp = b["logp"]
    classes = node_val(logp).shape[-1]
    nll_coef, smooth_coef = b["nll_coef"], b["smooth_coef"]
    # 12 digits: 1 - 0.9 is 0.09999999999999998 in binary, and the key should say 0.1.
    eps = float(f"{1.0 - nll_coef:.12g}")
    inst = _check_nll(root, b, eps)
    if inst.status == "declined":
        return inst
    reduction = inst.params["reduction"]
    shape_reduction = "mean" if "smooth_mean" in b.values else "sum" if "smooth_total" in b.values else "none"
    if shape_reduction != reduction:
        return decline(inst, f"smoothing term reduced as {shape_reduction!r}, the loss as {reduction!r}")
    if not isinstance(classes, int) or isinstance(smooth_coef, bool) or not isinstance(smooth_coef, (int, float)):
        # Under dynamic shapes e / C is a symbolic expression.
        return decline(inst, "label smoothing over a symbolic number of classes")
    if math.isclose(smooth_coef * classes, DYNAMIC_SCALAR, rel_tol=1e-9):  # e / C computed from the stand-in
        inst.flags["label_smoothing"] = "graph input"
        return decline(inst, graph_input_reason(["label_smoothing"]))
    if not 0.0 < eps <= 1.0 or not math.isclose(smooth_coef, eps / classes, rel_tol=1e-6):
        return decline(inst, f"coefficients {nll_coef:g} and {smooth_coef:g} are not (1 - e, e / {classes})")
    if b["smooth_ignore"] != inst.params["ignore_index"] or b["fill"] != 0:
        return decline(inst, "smoothing term masks other rows than the ignored ones")
    dims = b["smooth_dims"]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if dims not in ([1], [-1]):
        return decline(inst, f"smoothing term sums over dims {dims}, not the class dim")
    return inst


def _check_probs(root: Node, b) -> Instance:
    inst = _instance(root, b, "mean", -100, 0.0)
    return decline(inst, "probabilities as targets (only class indices are served)")


def _check_nll2d(root: Node, b) -> Instance:
    inst = _instance(root, b, "mean", -100, 0.0)
    return decline(inst, "class dim of a >2-D tensor (flatten the logits to [rows, classes])")


# The spellings served, each with its checker (linear_cross_entropy matches them over a matmul's output, in
# place of ``X``), then the near-misses worth a reason.
SERVED = ((SMOOTHED, _check_smoothed), (NLL, _check_nll))
PATTERNS = (*SERVED, (PROBS, _check_probs), (NLL2D, _check_nll2d))


def find_instances(graph: Graph) -> list[Instance]:
    """Every cross-entropy in ``graph`` (outermost spelling first), accepted or declined with a reason."""
    return find_all(graph, PATTERNS, overlap_hides=True)
