"""Finding rotary position embedding (RoPE) in the aten analysis graph, and pairing q with k.

The spellings and the aten ops they reach (``x`` is q or k, ``R`` its rotated width):

- HF ``rotate_half`` (Llama, Mistral, Qwen2, Gemma, ...): ``x * cos + rotate_half(x) * sin`` with
  ``rotate_half(x) = cat((-x[..., R/2:], x[..., :R/2]), -1)``
  -> ``add(mul(x, cos), mul(cat([neg(slice), slice], -1), sin))``                      layout ``half``;
  the halves also as ``x1, x2 = x.chunk(2, -1)`` (or ``split``): ``getitem``s of one ``split``
- GPT-J / Cohere ``rotate_every_two``: ``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``
  -> ``view(stack([neg(slice(.., 1, end, 2)), slice(.., 0, end, 2)], -1))``            layout ``interleaved``
- Meta Llama / gpt-fast complex form: ``view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) *
  freqs_cis).flatten(3).type_as(x)`` -> ``[_to_copy] view view_as_complex mul view_as_real view [_to_copy]``
                                                                                      layout ``complex``
  (the op takes ``freqs_cis`` as cos and sin and reads its real and imaginary parts in place);
- DeepSeek V2/V3 ``rope_interleave``: ``cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)`` with
  ``x1, x2 = x[..., 0::2], x[..., 1::2]`` and cos/sin one value per pair
  -> ``cat([sub(mul(x1, cos), mul(x2, sin)), add(mul(x2, cos), mul(x1, sin))], -1)``  layout ``deinterleave``;
  the same with ``x1, x2 = x.chunk(2, -1)`` (GPT-OSS)                                 layout ``half_pairs``;
- partial rotary (GPT-NeoX, Phi, GPT-J's ``rotary_dim``): any of the above applied to
  ``x[..., :R]`` and followed by ``cat((rotated, x[..., R:]), -1)``: the op takes the whole ``x`` and
  passes the last ``D - R`` columns through (flag ``rotary_dim``).

Operands commuted (``cos * x``, ``sin * rotate_half(x)``, the two products swapped) match too. cos and
sin are any tensors broadcastable to ``x`` that do not grow it (``unsqueeze(1)`` over heads, gathered at
any position ids); they are the op's inputs, so how they were made stays Inductor's.

One instance is one q/k pair: per-tensor matches whose cos and sin are the same nodes (or nodes
computing the same thing: GPT-J builds them once per tensor), of one layout, width and dtype, and of
shapes that differ at most in the heads (GQA), become one op call that rotates both in one launch; a
tensor with no partner is an instance of its own.

Declined with a reason (never rewritten): the minus on the other half (``cat((x2, -x1))``: a rotation
by minus the angle), no minus or two, halves in their own order, a rotation over another dim than the
last, cos or sin that are not tensors or that broadcast ``x`` to a larger shape or run over another
width, ``add`` with ``alpha``, q of rank other than 2 to 4 or of a non-float dtype, intermediates that
other code reads; in the complex form, math in another precision than float32 (freqs_cis not complex64,
an upcast to float64) or pairs that are not the last dim's. cos/sin that require grad are served (their
gradient is computed with torch ops).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autokernel.lowering.pattern import (
    Alt,
    Instance,
    Op,
    Var,
    aten,
    cast,
    cast_dtype,
    decline,
    dtype_name,
    find_all,
    match,
    node_val,
    size_hint,
)
from autokernel.lowering.rope.kernels import geometry
from autokernel.lowering.rope.ops import PATTERN

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

X = Var("x")
ROT = Alt((
    Op((aten.cat,), (Var("parts"),), name="rot"),
    Op((aten.view, aten._unsafe_view, aten.reshape), (Op((aten.stack,), (Var("parts"),), name="stack"),),
       name="rot"),
))
ROPE = Op((aten.add,), (
    Op((aten.mul,), (X, Var("cos")), name="mul_cos", commutative=True),
    Op((aten.mul,), (ROT, Var("sin")), name="mul_sin", commutative=True),
), name="core", commutative=True)
# Meta Llama: view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis).flatten(-2).type_as(x)
XF = Alt((cast(X, name="upcast"), X))
VIEWS = (aten.view, aten._unsafe_view, aten.reshape)
PAIRS = Op(VIEWS, (Alt((Op((aten.clone,), (XF,), name="pclone"), XF)),), name="pairs")
CMUL = Op((aten.mul,), (Op((aten.view_as_complex,), (PAIRS,), name="as_complex"), Var("freqs")), name="cmul",
          commutative=True)
FLAT = Op(VIEWS, (Op((aten.view_as_real,), (CMUL,), name="as_real"),), name="flat")
COMPLEX = Alt((cast(FLAT, name="outcast"), FLAT))
# DeepSeek, GPT-OSS: cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1), x1 and x2 the even and odd columns or
# the two halves. A list argument is matched by hand (_pair_rotation): the pattern binds the cat's parts.
PAIR_ROTATION = Op((aten.cat,), (Var("halves"),), name="dcat")
_LO = Op((aten.sub,), (Op((aten.mul,), (Var("x1"), Var("cos")), commutative=True),
                       Op((aten.mul,), (Var("x2"), Var("sin")), commutative=True)))
_HI = Op((aten.add,), (Op((aten.mul,), (Var("x2"), Var("cos")), commutative=True),
                       Op((aten.mul,), (Var("x1"), Var("sin")), commutative=True)), commutative=True)


# ---- the rotation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    src: Any
    dim: int
    start: Any
    end: Any
    step: Any


def _split_piece(node: Node) -> _Slice | None:
    """Piece ``i`` of ``x.chunk(2, d)`` / ``x.split(n, d)`` (``getitem(split(x, n, d), i)``) as a slice."""
    split, index = node.args
    if not (isinstance(split, Node) and split.op == "call_function" and isinstance(index, int)
            and getattr(split.target, "overloadpacket", None) in (aten.split, aten.split_with_sizes)):
        return None
    src = split.args[0]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    sv = node_val(src)
    pieces = node_val(split)
    if not isinstance(sv, torch.Tensor) or not isinstance(dim, int) or len(pieces) != 2:
        return None
    dim %= max(sv.dim(), 1)
    start = 0 if index == 0 else pieces[0].shape[dim]
    return _Slice(src, dim, start, start + pieces[index].shape[dim], 1)


def _slice(node: Any) -> _Slice | None:
    """``aten.slice(src, dim, start, end, step)`` with its defaults filled in and dim made positive; also a
    piece of a two-way split."""
    if isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem:
        return _split_piece(node)
    if not (isinstance(node, Node) and node.op == "call_function"
            and getattr(node.target, "overloadpacket", None) is aten.slice):
        return None
    names = ("src", "dim", "start", "end", "step")
    defaults = {"dim": 0, "start": None, "end": None, "step": 1}
    values = {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    src = values["src"]
    sv = node_val(src)
    if not isinstance(sv, torch.Tensor) or not isinstance(values["dim"], int):
        return None
    return _Slice(src, values["dim"] % max(sv.dim(), 1), values["start"] if values["start"] is not None else 0,
                  values["end"] if values["end"] is not None else sys.maxsize, values["step"])


def _known(expr: Any) -> bool:
    """True when ``expr`` (a bool or a SymBool of sizes) holds for every size, without a guard."""
    return statically_known_true(expr) if not isinstance(expr, bool) else expr


def _piece(p: Any, x: Node, width: Any, layout: str) -> tuple[bool, str | None, int | None, tuple[Node, ...]] | None:
    """(negated, which piece of ``x``: "lo"/"hi" halves or "even"/"odd" columns, None if neither, slice
    dim, nodes) of one part of the rotation; None when the part is not a slice of ``x`` at all."""
    nodes: tuple[Node, ...] = ()
    negated = False
    if isinstance(p, Node) and getattr(p.target, "overloadpacket", None) is aten.neg:
        negated, nodes, p = True, (p,), p.args[0]
    s = _slice(p)
    if s is None or s.src is not x:
        return None
    nodes += (p, p.args[0]) if p.target is operator.getitem else (p,)
    which = None
    if layout == "half" and _known(s.step == 1):
        if _known(s.start == 0) and _known(2 * s.end == width):
            which = "lo"
        elif _known(2 * s.start == width) and _known(s.end >= width):
            which = "hi"
    elif layout == "interleaved" and _known(s.step == 2) and _known(s.end >= width):
        which = "even" if _known(s.start == 0) else "odd" if _known(s.start == 1) else None
    return negated, which, s.dim, nodes


def _rotation(b) -> tuple[str, tuple[Node, ...], str | None] | None:
    """(layout, the rotation's part nodes, why it is not RoPE's rotation or None); None when the parts
    are not two slices of ``x`` (not a rotation of x at all: not reported)."""
    x, parts = b["x"], b["parts"]
    xv = node_val(x)
    if not isinstance(x, Node) or not isinstance(xv, torch.Tensor) or xv.dim() < 1:
        return None
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    layout = "interleaved" if b.get("stack") is not None else "half"
    rank, width = xv.dim(), xv.shape[-1]
    pieces = [_piece(p, x, width, layout) for p in parts]
    if any(p is None for p in pieces):
        return None
    (neg0, which0, dim0, nodes0), (neg1, which1, dim1, nodes1) = pieces
    nodes = tuple(dict.fromkeys(nodes0 + nodes1))  # a split feeds both pieces
    rot = b["rot"]
    if layout == "half":
        cat_dim = rot.args[1] if len(rot.args) > 1 else rot.kwargs.get("dim", 0)
        joined_last = isinstance(cat_dim, int) and cat_dim % rank == rank - 1
        first, second = "hi", "lo"
    else:
        stack = b["stack"]
        stack_dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
        rv = node_val(rot)
        joined_last = (isinstance(stack_dim, int) and stack_dim % (rank + 1) == rank and isinstance(rv, torch.Tensor)
                       and rv.dim() == rank and all(_known(a == c) for a, c in zip(rv.shape, xv.shape, strict=True)))
        first, second = "odd", "even"
    if dim0 != rank - 1 or dim1 != rank - 1:
        return layout, nodes, f"rotates over dim {dim0 if dim0 != rank - 1 else dim1}, not the last"
    if not joined_last:
        return layout, nodes, "joins the rotated pieces over another dim than the last"
    if which0 is None or which1 is None or which0 == which1:
        return layout, nodes, "the pieces are not the two halves (or the even and odd columns) of x"
    if (which0, which1) != (first, second):
        return layout, nodes, "the pieces are in their own order: a reflection, not a rotation"
    if (neg0, neg1) == (False, True):
        return layout, nodes, "the minus is on the other piece (rotation by minus the angle)"
    if (neg0, neg1) != (True, False):
        return layout, nodes, "no minus on the moved piece: not a rotation" if not neg0 else "both pieces negated"
    return layout, nodes, None


# ---- instances -----------------------------------------------------------------------------------


def _hints(shape) -> tuple[int, ...]:
    return tuple(size_hint(s) for s in shape)


def _describe(inst: Instance) -> Instance:
    """Fill in the shape (q as ``[B, heads, N, D]``) and the flags from the inputs."""
    q, k, cos = (node_val(inst.inputs[n]) if inst.inputs[n] is not None else None for n in ("q", "k", "cos"))
    g = geometry(_hints(q.shape), _hints(k.shape) if k is not None else None, _hints(cos.shape))
    shape = (1,) * g.pad + tuple(q.shape)
    if g.swap:
        shape = (shape[0], shape[2], shape[1], shape[3])
    kv_heads = 0
    if k is not None:
        kshape = (1,) * g.pad + tuple(k.shape)
        kv_heads = size_hint(kshape[2] if g.swap else kshape[1])
    p = inst.params
    inst.shape = shape
    inst.flags = {"layout": p["layout"], "rotary_dim": p["rotary_dim"], "heads": size_hint(shape[1]),
                  "kv_heads": kv_heads, "cs": dtype_name(cos.dtype), "out": dtype_name(p["out_dtype"])}
    return inst


def _same_shape(a, c) -> bool:
    return len(a) == len(c) and all(_known(p == q) for p, q in zip(a, c, strict=True))


def _rotation_instance(root: Node, nodes: tuple[Node, ...], x: Node, cos: Any, sin: Any, layout: str) -> Instance:
    """The instance of a rotation of all of ``x`` (its width the rotary dim), its status still to decide."""
    xv, outv = node_val(x), node_val(root)
    return Instance(
        pattern=PATTERN, root=root, nodes=nodes, inputs={"q": x, "k": None, "cos": cos, "sin": sin},
        params={"layout": layout, "rotary_dim": size_hint(xv.shape[-1]), "out_dtype": getattr(outv, "dtype", None)},
        flags={"layout": layout}, dtype=dtype_name(xv.dtype), shape=tuple(xv.shape), requires_grad=False,
    )


def _check(root: Node, b) -> Instance | None:
    x, cos, sin = b["x"], b["cos"], b["sin"]
    rotation = _rotation(b)
    if rotation is None:
        return None  # the parts are not two slices of x: no rotation of x at all
    layout, extra, problem = rotation
    inst = _rotation_instance(root, b.nodes + extra, x, cos, sin, layout)
    if problem:
        return decline(inst, problem)
    if root.kwargs.get("alpha", 1) != 1:
        return decline(inst, f"add with alpha {root.kwargs['alpha']}")
    problem = _operands_problem(x, cos, sin, root, per_pair=False)
    if problem:
        return decline(inst, problem)
    inst.status = "miss"
    return _describe(inst)


def _operands_problem(x: Node, cos: Any, sin: Any, root: Node, per_pair: bool) -> str | None:
    """Why a rotation of ``x`` by ``cos``/``sin`` (one value per rotated column, or per pair) into ``root`` cannot
    be served, or None."""
    xv, cv, sv, outv = node_val(x), node_val(cos), node_val(sin), node_val(root)
    width = xv.shape[-1]
    if not (isinstance(cv, torch.Tensor) and isinstance(sv, torch.Tensor)):
        return "cos or sin is not a tensor"
    if not 2 <= xv.dim() <= 4:
        return f"x of rank {xv.dim()} (supported: 2 to 4)"
    for name, t in (("x", xv), ("cos", cv), ("sin", sv), ("output", outv)):
        if t.dtype not in FLOATS:
            return f"{name} dtype {t.dtype} (supported: fp32, fp16, bf16)"
    if cos is x or sin is x:
        return "cos or sin is x itself"
    for name, t in (("cos", cv), ("sin", sv)):
        if t.dim() > xv.dim() or not _known((2 * t.shape[-1] if per_pair else t.shape[-1]) == width):
            return (f"{name} of shape {tuple(t.shape)} for x of shape {tuple(xv.shape)}: not one value per "
                    + ("pair" if per_pair else "rotated column"))
    if not _same_shape(outv.shape, xv.shape):
        return f"cos/sin broadcast x {tuple(xv.shape)} to {tuple(outv.shape)}"
    if cv.device != xv.device or sv.device != xv.device:
        return "cos/sin on another device than x"
    return None


def _pair_rotation(b) -> tuple[str, Node, Node, Node, tuple[Node, ...]] | None:
    """(layout, x, cos, sin, nodes) when the cat's two parts rotate x's even and odd columns (``deinterleave``) or
    its halves (``half_pairs``), joined over the last dim; None otherwise (not reported: most cats are no
    rotation)."""
    parts, cat = b["halves"], b["dcat"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    for lo in match(_LO, parts[0]):
        for hi in match(_HI, parts[1], lo):
            s1 = _slice(hi["x1"])
            x = s1.src if s1 is not None else None
            xv = node_val(x)
            if not isinstance(x, Node) or not isinstance(xv, torch.Tensor) or xv.dim() < 1:
                continue
            rank, width = xv.dim(), xv.shape[-1]
            cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            if not (isinstance(cat_dim, int) and cat_dim % rank == rank - 1):
                continue
            for pieces, layout, which in (("interleaved", "deinterleave", ("even", "odd")),
                                          ("half", "half_pairs", ("lo", "hi"))):
                p1, p2 = _piece(hi["x1"], x, width, pieces), _piece(hi["x2"], x, width, pieces)
                if (p1 is not None and p2 is not None and not p1[0] and not p2[0] and (p1[1], p2[1]) == which
                        and p1[2] == p2[2] == rank - 1):
                    return layout, x, hi["cos"], hi["sin"], tuple(dict.fromkeys((*hi.nodes, *p1[3], *p2[3])))
    return None


def _check_pair_rotation(root: Node, b) -> Instance | None:
    rotation = _pair_rotation(b)
    if rotation is None:
        return None  # most cats are no rotation
    layout, x, cos, sin, extra = rotation
    inst = _rotation_instance(root, b.nodes + extra, x, cos, sin, layout)
    problem = _operands_problem(x, cos, sin, root, per_pair=True)
    if problem:
        return decline(inst, problem)
    inst.status = "miss"
    return _describe(inst)


def _check_complex(root: Node, b) -> Instance:
    x, freqs = b["x"], b["freqs"]
    xv, fv, outv = node_val(x), node_val(freqs), node_val(root)
    width = xv.shape[-1] if isinstance(xv, torch.Tensor) and xv.dim() else 0
    inst = Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"q": x, "k": None, "cos": freqs, "sin": freqs},
        params={"layout": "complex", "rotary_dim": size_hint(width), "out_dtype": getattr(outv, "dtype", None)},
        flags={"layout": "complex"}, dtype=dtype_name(xv.dtype) if isinstance(xv, torch.Tensor) else "?",
        shape=tuple(xv.shape) if isinstance(xv, torch.Tensor) else (), requires_grad=False,
    )
    if not isinstance(xv, torch.Tensor) or not 2 <= xv.dim() <= 4:
        return decline(inst, "x is not a tensor of rank 2 to 4")
    if xv.dtype not in FLOATS or outv.dtype not in FLOATS:
        return decline(inst, f"x dtype {xv.dtype}, output {outv.dtype} (supported: fp32, fp16, bf16)")
    upcast = b.get("upcast")
    if upcast is not None and cast_dtype(upcast) != torch.float32:
        return decline(inst, f"computes in {cast_dtype(upcast)}, not float32")
    if b.get("outcast") is not None and cast_dtype(b["outcast"]) is None:
        return decline(inst, "output conversion changes more than the dtype")
    pv, cv = node_val(b["pairs"]), node_val(b["cmul"])
    if not _same_shape(pv.shape, (*xv.shape[:-1], width // 2, 2)) or not _known(width % 2 == 0):
        return decline(inst, f"pairs {tuple(pv.shape)} are not the last dim's (even, odd) columns of {tuple(xv.shape)}")
    if not isinstance(fv, torch.Tensor) or fv.dtype != torch.complex64:
        return decline(inst, f"freqs_cis is {getattr(fv, 'dtype', type(fv).__name__)}, not a complex64 tensor")
    if fv.dim() > xv.dim() or not _known(fv.shape[-1] * 2 == width) or not _same_shape(cv.shape, pv.shape[:-1]):
        return decline(inst, f"freqs_cis of shape {tuple(fv.shape)} for pairs of shape {tuple(pv.shape[:-1])}")
    if not _same_shape(outv.shape, xv.shape):
        return decline(inst, f"flattens to {tuple(outv.shape)}, not x's shape {tuple(xv.shape)}")
    if fv.device != xv.device:
        return decline(inst, "freqs_cis on another device than x")
    inst.status = "miss"
    return _describe(inst)


def _users_inside(node: Node, inside: set[Node]) -> bool:
    return all(u in inside or (not u.users and u.op == "call_function") for u in node.users)


def _absorb_partial(inst: Instance, claimed: set[Node]) -> None:
    """Partial rotary: when the rotated ``x`` is ``q[..., :R]`` and the result is only read by
    ``cat((result, q[..., R:]), -1)``, the op takes ``q`` whole and copies its last columns itself."""
    root, x = inst.root, inst.inputs["q"]
    users = list(root.users)
    if len(users) != 1:
        return
    cat = users[0]
    if getattr(cat.target, "overloadpacket", None) is not aten.cat or cat in claimed:
        return
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    xs = _slice(x)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or parts[0] is not root or xs is None:
        return
    rest = _slice(parts[1])
    q = xs.src
    qv = node_val(q)
    rank = qv.dim()
    if rest is None or rest.src is not q or not isinstance(dim, int) or dim % rank != rank - 1:
        return
    width = node_val(x).shape[-1]
    if not (xs.dim == rank - 1 and rest.dim == rank - 1 and _known(xs.step == 1) and _known(rest.step == 1)
            and _known(xs.start == 0) and _known(xs.end == width) and _known(rest.start == width)
            and _known(rest.end >= qv.shape[-1])):
        return
    inside = set(inst.nodes) | {x, parts[1], cat}
    if not (_users_inside(x, inside) and _users_inside(parts[1], inside)) or x in claimed or parts[1] in claimed:
        return
    inst.nodes = (*inst.nodes, x, parts[1], cat)
    inst.root = cat
    inst.inputs["q"] = q
    inst.params["out_dtype"] = node_val(cat).dtype
    _describe(inst)


# ---- pairing -------------------------------------------------------------------------------------


def _same_value(a: Any, c: Any, depth: int = 6) -> bool:
    """Whether ``a`` and ``c`` are the same node, or nodes computing the same thing from the same inputs
    (deterministic ops, equal arguments; GPT-J builds cos/sin once per tensor)."""
    if a is c:
        return True
    if isinstance(a, (list, tuple)) and isinstance(c, (list, tuple)):
        return len(a) == len(c) and all(_same_value(p, q, depth) for p, q in zip(a, c, strict=True))
    if not (isinstance(a, Node) and isinstance(c, Node)) or depth == 0:
        return not isinstance(a, Node) and not isinstance(c, Node) and type(a) is type(c) and a == c
    if a.op != "call_function" or c.op != "call_function" or a.target is not c.target:
        return False
    tags = getattr(a.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    return (_same_value(list(a.args), list(c.args), depth - 1)
            and a.kwargs.keys() == c.kwargs.keys()
            and all(_same_value(a.kwargs[n], c.kwargs[n], depth - 1) for n in a.kwargs))


def _pairable(a: Instance, c: Instance, order: dict[Node, int]) -> bool:
    if a.params != c.params or a.dtype != c.dtype:
        return False
    if not (_same_value(a.inputs["cos"], c.inputs["cos"]) and _same_value(a.inputs["sin"], c.inputs["sin"])):
        return False
    qv, kv, cv = node_val(a.inputs["q"]), node_val(c.inputs["q"]), node_val(a.inputs["cos"])
    if qv.dim() != kv.dim() or qv.device != kv.device:
        return False
    g = geometry(_hints(qv.shape), _hints(kv.shape), _hints(cv.shape))
    q4, k4 = (1,) * g.pad + tuple(qv.shape), (1,) * g.pad + tuple(kv.shape)
    heads = 2 if g.swap else 1
    if not all(_known(q4[i] == k4[i]) for i in range(4) if i != heads):
        return False
    # The op stands where the first output was: both inputs must be computed before either output.
    return max(order[a.inputs["q"]], order[c.inputs["q"]]) < min(order[a.root], order[c.root])


def _pair(instances: list[Instance], graph: Graph) -> list[Instance]:
    """Merge accepted per-tensor instances that share cos/sin into q/k pairs, in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    out: list[Instance] = []
    taken: set[int] = set()
    for i, a in enumerate(instances):
        if i in taken:
            continue
        if a.status != "declined":
            for j in range(i + 1, len(instances)):
                c = instances[j]
                if j not in taken and c.status != "declined" and _pairable(a, c, order):
                    taken.add(j)
                    nodes = a.nodes + tuple(n for n in c.nodes if n not in set(a.nodes))
                    a = Instance(pattern=PATTERN, root=a.root, nodes=nodes,
                                 inputs={**a.inputs, "k": c.inputs["q"]}, params=dict(a.params), flags={},
                                 dtype=a.dtype, shape=a.shape, requires_grad=False, status=a.status,
                                 side_outputs={"k": c.root})
                    _describe(a)
                    break
        out.append(a)
    return out


def find_instances(graph: Graph) -> list[Instance]:
    """Every RoPE in ``graph`` (q/k pairs merged), accepted or declined with a reason."""
    found = find_all(graph, ((ROPE, _check), (COMPLEX, _check_complex), (PAIR_ROTATION, _check_pair_rotation)),
                     on_accept=_absorb_partial)
    return _pair(found, graph)
