"""Finding the lm_head matmul that feeds a cross-entropy, in the aten analysis graph.

The pattern is cross_entropy's (every spelling its matcher serves: ``F.cross_entropy`` / ``nn.CrossEntropyLoss``
/ ``nll_loss(log_softmax)``, label smoothing, ``logits.float()``, HF's ``ForCausalLMLoss`` flatten) with its
logits ``X`` replaced by a matmul: ``h @ W.T``, ``F.linear(h, W[, b])``, ``nn.Linear`` reach aten as ``mm`` or
``addmm`` of ``h`` (flattened to rows by a view when it has more than two dims) and ``t`` / ``permute`` /
``transpose`` of ``W``, the result viewed back to ``[..., V]``. The cross-entropy's checker runs first and its
reasons are kept; then the matmul's own checks.

Declined (left to the cross_entropy family and Inductor): a weight used untransposed (``h @ W`` with ``W``
``[H, V]``), ``addmm`` with ``alpha`` / ``beta``, a bias that is not one value per class, mixed dtypes, a
symbolic vocabulary size, and logits that other graph nodes read (their gradient would need a logits-sized
tensor). Logits that are only *returned* from the graph (HF's ``CausalLMOutput.logits``) are kept: the op
writes them once as a side output, without gradient.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autokernel.lowering.cross_entropy.match import FLATTEN_OPS, FLOATS, SERVED
from autokernel.lowering.linear_cross_entropy.ops import PATTERN
from autokernel.lowering.pattern import (
    Alt,
    Const,
    Instance,
    Op,
    Var,
    aten,
    decline,
    dtype_name,
    find_all,
    node_val,
    substitute,
)

W = Var("w")
WT = Alt((
    Op((aten.t,), (W,), name="wt"),
    Op((aten.permute,), (W, Var("perm")), name="wt"),
    Op((aten.transpose,), (W, Const("dim0"), Const("dim1")), name="wt"),
))
H_ROWS = Alt((Op(FLATTEN_OPS, (Var("h"), Var("hshape")), name="hflat"), Var("h")))


def _matmul(name: str) -> Alt:
    return Alt((Op((aten.mm,), (H_ROWS, WT), name=name), Op((aten.addmm,), (Var("bias"), H_ROWS, WT), name=name)))


# The logits as the cross-entropy reads them (bound as its ``x``): the matmul, or the matmul viewed back to
# the leading dims of ``h``.
LOGITS = Alt((Op(FLATTEN_OPS, (_matmul("mm"), Var("lshape")), name="x"), _matmul("x")))


def _readers_outside(node: Node, inside: set[Node]) -> list[Node]:
    # Dead nodes don't count (the analysis view is not dead-code eliminated).
    return [u for u in node.users if u not in inside and (u.users or u.op != "call_function")]


def _check_matmul(inst: Instance, b) -> Instance:
    h, w, x = b["h"], b["w"], b["x"]
    mm = b.get("mm", x)
    hv, wv, mv, xv = node_val(h), node_val(w), node_val(mm), node_val(x)
    if not all(isinstance(v, torch.Tensor) for v in (hv, wv, mv, xv)):
        return decline(inst, "matmul operands are not tensors")
    if wv.dim() != 2 or mv.dim() != 2:
        return decline(inst, f"weight of rank {wv.dim()} (a [classes, hidden] matrix expected)")
    wt = b["wt"]
    if wt.target.overloadpacket is aten.permute and list(b["perm"]) != [1, 0]:
        return decline(inst, f"weight permuted by {list(b['perm'])}, not transposed")
    if wt.target.overloadpacket is aten.transpose and {b["dim0"] % 2, b["dim1"] % 2} != {0, 1}:
        return decline(inst, "weight transposed over other dims")
    if hv.dtype != wv.dtype or hv.dtype not in FLOATS:
        return decline(inst, f"hidden states {hv.dtype} and weight {wv.dtype} (one of fp32, fp16, bf16 expected)")
    if mv.dtype != hv.dtype:
        return decline(inst, f"matmul output {mv.dtype} from {hv.dtype} inputs")
    vocab = wv.shape[0]
    if not isinstance(vocab, int):
        return decline(inst, "symbolic vocabulary size (the cache keys on it)")
    if not statically_known_true(hv.shape[-1] == wv.shape[1]):
        return decline(inst, f"hidden states of width {hv.shape[-1]} for a weight of {tuple(wv.shape)}")
    if b.get("hflat") is not None and hv.dim() < 2:
        return decline(inst, "hidden states of rank < 2 viewed to rows")
    if xv.dim() < 1 or not statically_known_true(xv.shape[-1] == vocab):
        return decline(inst, f"logits viewed to {tuple(xv.shape)}, not [..., {vocab}]")
    if mm.target.overloadpacket is aten.addmm:
        if mm.kwargs.get("alpha", 1) != 1 or mm.kwargs.get("beta", 1) != 1:
            return decline(inst, "addmm with alpha or beta")
        bv = node_val(b["bias"])
        if not isinstance(bv, torch.Tensor) or bv.dim() != 1 or bv.dtype != hv.dtype:
            return decline(inst, "bias is not one value per class of the weight's dtype")
    inside = set(inst.nodes)
    readers = _readers_outside(x, inside)
    if any(r.op != "output" for r in readers):
        other = next(r for r in readers if r.op != "output")
        return decline(inst, f"logits are also read by {other.name} (only returning them is served: their gradient "
                             "would need a logits-sized tensor)")
    if readers:
        inst.side_outputs = {"logits": x}
        inst.params["keep_logits"] = inst.flags["logits_out"] = True
    return inst


def _checker(ce_check):
    def check(root: Node, b) -> Instance:
        ce = ce_check(root, b)
        w, bias = b.get("w"), b.get("bias")
        wv = node_val(w)
        vocab = wv.shape[0] if isinstance(wv, torch.Tensor) and wv.dim() == 2 else 0
        hidden = wv.shape[1] if isinstance(wv, torch.Tensor) and wv.dim() == 2 else 0
        hv = node_val(b.get("h"))
        inner = node_val(b["logp"].args[0])
        params = {**ce.params, "keep_logits": False}
        flags = {**ce.flags, "bias": bias is not None, "vocab": vocab if isinstance(vocab, int) else str(vocab),
                 "logits_out": False}
        inst = Instance(
            pattern=PATTERN, root=root, nodes=b.nodes,
            inputs={"x": b.get("h"), "weight": w, "bias": bias, "labels": b.get("labels")},
            params=params, flags=flags,
            dtype=dtype_name(hv.dtype) if isinstance(hv, torch.Tensor) else "?",
            shape=(inner.shape[0] if isinstance(inner, torch.Tensor) and inner.dim() == 2 else 0, hidden),
            requires_grad=False,
        )
        if ce.status == "declined":
            return decline(inst, ce.reason)
        inst.status = "miss"
        return _check_matmul(inst, b)

    return check


PATTERNS = tuple((substitute(pattern, "x", LOGITS), _checker(check)) for pattern, check in SERVED)


def find_instances(graph: Graph) -> list[Instance]:
    """Every linear + cross-entropy in ``graph`` (outermost spelling first), accepted or declined with a reason."""
    return find_all(graph, PATTERNS, overlap_hides=True)
