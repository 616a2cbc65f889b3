"""Patterns as data over the aten analysis graph, and the instances they find.

A pattern is a tree of :class:`Op`, :class:`Alt`, :class:`Var` and :class:`Const` nodes rooted at the
pattern's output, in the spirit of ``torch/_inductor/pattern_matcher.py``: a family writes *what* the
math looks like (every spelling is one more alternative), and :func:`match` does the walking. A
family's checker then looks at the bindings and either accepts the match or declines it with a reason
(a mean over the wrong dim, a sum where a mean belongs, ...), as lightning-thunder's executors claim
an op through a checker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten


class Pattern:
    """Base of the pattern tree."""


@dataclass(frozen=True)
class Var(Pattern):
    """Binds whatever stands here (a node or a Python value); the same name must bind the same thing."""

    name: str


@dataclass(frozen=True)
class Const(Pattern):
    """Binds a Python number (not a node): eps, a power, a weight offset."""

    name: str


@dataclass(frozen=True)
class Op(Pattern):
    """A call of one of ``targets`` (OpOverloadPackets) whose leading args match ``args``.

    Trailing args and kwargs are not matched; the checker reads them off the bound node. With
    ``commutative`` the two args may come in either order. ``name`` binds the node itself.
    """

    targets: tuple[Any, ...]
    args: tuple[Pattern, ...]
    name: str | None = None
    commutative: bool = False


@dataclass(frozen=True)
class Alt(Pattern):
    """The first alternative that matches, then the next on backtracking."""

    options: tuple[Pattern, ...]


@dataclass
class Bindings:
    values: dict[str, Any] = field(default_factory=dict)
    nodes: tuple[Node, ...] = ()

    def bind(self, name: str, value: Any) -> Bindings | None:
        if name in self.values:
            return self if _same(self.values[name], value) else None
        return Bindings({**self.values, name: value}, self.nodes)

    def add_node(self, node: Node) -> Bindings:
        return self if node in self.nodes else Bindings(self.values, self.nodes + (node,))

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    return a == b


def _packet(node: Node) -> Any:
    target = node.target
    return getattr(target, "overloadpacket", target)


def match(pattern: Pattern, value: Any, bindings: Bindings | None = None) -> Iterator[Bindings]:
    """Yield every way ``value`` (a node or an argument) matches ``pattern``."""
    b = bindings if bindings is not None else Bindings()
    if isinstance(pattern, Var):
        nb = b.bind(pattern.name, value)
        if nb is not None:
            yield nb
    elif isinstance(pattern, Const):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            nb = b.bind(pattern.name, value)
            if nb is not None:
                yield nb
    elif isinstance(pattern, Alt):
        for option in pattern.options:
            yield from match(option, value, b)
    elif isinstance(pattern, Op):
        if not (isinstance(value, Node) and value.op == "call_function"):
            return
        if _packet(value) not in pattern.targets or len(value.args) < len(pattern.args):
            return
        if pattern.name is not None:
            b = b.bind(pattern.name, value)
            if b is None:
                return
        b = b.add_node(value)
        orders = [value.args[: len(pattern.args)]]
        if pattern.commutative and len(pattern.args) == 2:
            orders.append((value.args[1], value.args[0]))
        for args in orders:
            yield from _match_args(pattern.args, args, b)
    else:
        raise TypeError(f"not a pattern: {pattern!r}")


def _match_args(patterns: tuple[Pattern, ...], args: tuple[Any, ...], b: Bindings) -> Iterator[Bindings]:
    if not patterns:
        yield b
        return
    for nb in match(patterns[0], args[0], b):
        yield from _match_args(patterns[1:], args[1:], nb)


# ---- helpers the families share -------------------------------------------------------------

# What the analysis view holds where the model reads a Python scalar that Dynamo made a graph input
# (``.item()`` of it; dynamic=True does this to float attributes). An odd float no model writes, so
# that a Const binding it can be told from a real constant by :func:`is_dynamic_scalar`.
DYNAMIC_SCALAR = float.fromhex("0x1.a5c0ffeep-999")


def is_dynamic_scalar(value: Any) -> bool:
    return isinstance(value, float) and value == DYNAMIC_SCALAR


def is_graph_input(value: Any) -> bool:
    """Whether a matched scalar parameter is one Dynamo made a graph input: a float read as the stand-in
    :data:`DYNAMIC_SCALAR`, or an int left as the node that computes it. A kernel bakes its scalars in, so an
    instance holding one is never served (the backend declines it, naming it)."""
    return is_dynamic_scalar(value) or isinstance(value, Node)


def graph_input_reason(names: Sequence[str]) -> str:
    """The decline reason for an instance whose parameters ``names`` are graph inputs."""
    verb = "is a graph input" if len(names) == 1 else "are graph inputs"
    return (f"{' and '.join(names)} {verb}, not a constant (dynamic=True, or a value that changed between calls, "
            "makes scalars graph inputs; torch._dynamo.config.specialize_float = True keeps floats constant, "
            "dynamic=False ints)")


def cast(inner: Pattern, name: str | None = None) -> Op:
    """A dtype conversion as the analysis view spells it (``.to``, ``.float()``, ``type_as``)."""
    return Op((aten._to_copy,), (inner,), name=name)


def node_val(node: Any) -> Any:
    """The fake value the analysis view recorded for ``node`` (None for non-nodes)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def cast_dtype(node: Node) -> torch.dtype | None:
    """The target dtype of a ``_to_copy`` node, or None when it changes more than the dtype."""
    kwargs = dict(node.kwargs)
    if set(kwargs) - {"dtype", "memory_format", "layout", "device"}:
        return None
    if kwargs.get("layout") not in (None, torch.strided):
        return None
    src = node_val(node.args[0])
    if kwargs.get("device") is not None and (src is None or torch.device(kwargs["device"]) != src.device):
        return None
    return kwargs.get("dtype")


def size_hint(size: Any) -> int:
    """A size's example value, without installing a guard."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    if hint is None:
        shape_env = size.node.shape_env
        hint = shape_env.size_hint(size.node.expr, allow_none=True)
    return int(hint) if hint is not None else 1


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


@dataclass
class Instance:
    """One place in a graph where a family's pattern stands.

    ``nodes`` are the aten analysis nodes of the match, ``inputs`` maps the op's tensor inputs to
    aten nodes (or None), ``params`` are the op's non-tensor arguments; ``flags`` are the variant
    flags that enter the cache key; ``status``/``reason`` are filled in by the checker and the
    cache lookup.
    """

    pattern: str
    root: Node
    nodes: tuple[Node, ...]
    inputs: dict[str, Node | None]
    params: dict[str, Any]
    flags: dict[str, Any]
    dtype: str
    shape: tuple[Any, ...]
    requires_grad: bool
    status: str = "miss"
    reason: str = ""
    source: str = ""
    # Values of inner nodes that the op also returns because code outside the match reads them
    # (add + RMSNorm: the sum, which the residual stream carries on): name -> aten node.
    side_outputs: dict[str, Node] = field(default_factory=dict)


def decline(inst: Instance, reason: str) -> Instance:
    """Mark ``inst`` declined (never rewritten), saying why."""
    inst.status, inst.reason = "declined", reason
    return inst


def internal_users_problem(inst: Instance) -> str | None:
    """Why ``inst`` cannot be cut out of its graph when code outside the match reads one of its inner
    nodes (other than its root and its side outputs), else None."""
    inside = set(inst.nodes)
    side = set(inst.side_outputs.values())
    for node in inst.nodes:
        if node is inst.root or node in side:
            continue
        for user in node.users:
            # Dead nodes don't count (the analysis view is not dead-code eliminated: a fused op's unused
            # output, nll_loss_forward's total_weight, still has its getitem).
            if user not in inside and (user.users or user.op != "call_function"):
                return f"intermediate {node.name} is also used by {user.name}"
    return None


def find_all(graph: Graph, alternatives: Sequence[tuple[Pattern, Callable[[Node, Bindings], Instance | None]]], *,
             skip: Callable[[Bindings], bool] | None = None,
             on_accept: Callable[[Instance, set[Node]], None] | None = None,
             overlap_hides: bool = False) -> list[Instance]:
    """Every instance of a family in ``graph``, accepted or declined with a reason, in graph order.

    Roots are tried from the graph's end, so the outermost spelling wins; per root, the alternatives in
    order, and the first binding its check accepts (and whose inner nodes nobody else reads) claims its
    nodes. A check returns None for a binding that is no instance of the family at all (not reported);
    ``skip`` drops a binding before its check (a cheaper test of the same); ``on_accept(inst, claimed)`` may
    grow an accepted instance (before it claims). A root with no accepted binding reports its first
    near-miss, once: not when an accepted match took part of it, nor when a larger near-miss holds all of it
    (with ``overlap_hides``, any of it)."""
    accepted: list[Instance] = []
    declined: list[Instance] = []
    claimed: set[Node] = set()
    for root in reversed(list(graph.nodes)):
        if root.op != "call_function" or root in claimed or not root.users:
            continue
        found = near = None
        for pattern, check in alternatives:
            for b in match(pattern, root):
                if claimed.intersection(b.nodes) or (skip is not None and skip(b)):
                    continue
                inst = check(root, b)
                if inst is None:
                    continue
                if inst.status != "declined":
                    problem = internal_users_problem(inst)
                    if problem:
                        decline(inst, problem)
                if inst.status != "declined":
                    found = inst
                    break
                near = near or inst
            if found is not None:
                break
        if found is not None:
            if on_accept is not None:
                on_accept(found, claimed)
            accepted.append(found)
            claimed.update(found.nodes)
        elif near is not None:
            declined.append(near)
    kept: list[Instance] = []
    for d in sorted(declined, key=lambda i: -len(i.nodes)):
        nodes = set(d.nodes)
        hidden = any(nodes & set(k.nodes) if overlap_hides else nodes <= set(k.nodes) for k in kept)
        if not claimed.intersection(nodes) and not hidden:
            kept.append(d)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(accepted + kept, key=lambda i: order[i.root])


def substitute(pattern: Pattern, name: str, replacement: Pattern) -> Pattern:
    """``pattern`` with every ``Var(name)`` replaced by ``replacement``: a family whose pattern contains
    another's (the matmul feeding a cross-entropy) writes only what it adds."""
    if isinstance(pattern, Var):
        return replacement if pattern.name == name else pattern
    if isinstance(pattern, Alt):
        return Alt(tuple(substitute(p, name, replacement) for p in pattern.options))
    if isinstance(pattern, Op):
        return Op(pattern.targets, tuple(substitute(p, name, replacement) for p in pattern.args), pattern.name,
                  pattern.commutative)
    return pattern
