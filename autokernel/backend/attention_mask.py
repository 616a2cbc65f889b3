"""Attention masks that are constants of the graph, handed to SDPA as what they are.

transformers builds the causal mask itself and passes it to ``scaled_dot_product_attention`` as ``attn_mask``
whenever it cannot prove the mask redundant. Under ``torch.compile`` with torch < 2.14 it never skips it (its
``_ignore_causal_mask_sdpa`` sees Dynamo's constant ``is_exporting() == True``), so a compiled model runs SDPA
with an explicit ``[B, 1, L, S]`` mask: no causal block skipping (twice the attention FLOPs), the mask read by
every call, and with GQA the key/value heads repeated first. Eager transformers passes ``is_causal=True``.

When the mask is computed inside the graph from constants only (aranges, comparisons, shapes: nothing read
from a graph input), its value is known at compile time. It is computed once here, exactly as the graph would,
and compared with SDPA's own definitions: equal to ``ones(L, S).tril()`` (``is_causal=True``) or everywhere
allowed (no mask). Only then is the call rewritten; anything else (a padding mask read from an input, a
sliding window, a bottom-right aligned decode mask, biases) is declined with the reason. Where the mask goes and
the key and value are transformers' ``repeat_kv`` of fewer heads (done only because a mask was passed), SDPA gets
the heads unrepeated with ``enable_gqa=True``, as eager transformers calls it: no repeated copies, in the forward
or saved for the backward. No kernel of ours is involved, so nothing here is cached or tuned: the check is exact,
and it runs on every compile.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from autokernel.backend.analysis import source_line

logger = logging.getLogger("autokernel")

PATTERN = "attention_mask"
SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
# torch._C._nn.scaled_dot_product_attention's parameters after (query, key, value).
SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# The largest tensor (elements) the check computes: a [1, 1, 32768, 32768] mask is 1 GiB of booleans.
MAX_CHECKED_NUMEL = 2**30
# transformers' repeat_kv: x[:, :, None, :, :].expand(B, KV, n_rep, S, D).reshape(B, KV * n_rep, S, D)
_REPEAT_INDEX = (slice(None), slice(None), None, slice(None), slice(None))
_INPLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.iand, operator.ior, operator.ixor)


@dataclass
class MaskRewrite:
    """One SDPA call with an ``attn_mask``: what its mask is, and the call's new keyword arguments."""

    sdpa: Node
    status: str  # "rewritten" or "declined"
    reason: str
    kind: str = ""  # "causal" or "none" (everywhere allowed) when rewritten
    dtype: str = ""
    shape: tuple[Any, ...] = ()
    args: tuple[Any, ...] = ()  # the call's new (query, key, value)
    kwargs: dict[str, Any] = field(default_factory=dict)
    dead: set[Node] = field(default_factory=set)  # the nodes the rewrite may leave unused (erased if they are)
    gqa: int = 0  # key/value heads unrepeated: each served this many query heads


def find_mask_rewrites(gm: GraphModule) -> list[MaskRewrite]:
    """Every SDPA call of ``gm`` that has an ``attn_mask``, with the verdict on its mask. Reads the graph and
    computes the constant masks; changes nothing."""
    found = []
    # One evaluation per mask node (every layer shares it) and pair of lengths (the comparison's shape).
    masks: dict[tuple[Node, Any, Any], tuple[str, str] | str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        kwargs = _sdpa_kwargs(node)
        mask = kwargs.get("attn_mask")
        if mask is None:
            continue
        rewrite = MaskRewrite(node, "declined", "")
        value = mask.meta.get("example_value") if isinstance(mask, Node) else None
        if isinstance(value, torch.Tensor):
            rewrite.dtype = str(value.dtype).removeprefix("torch.")
            rewrite.shape = tuple(s if isinstance(s, int) else str(s) for s in value.shape)
        lengths = (_seq_len(node.args[0]), _seq_len(node.args[1]))
        key = (mask, *lengths) if isinstance(mask, Node) else None
        try:
            verdict = masks.get(key) if key is not None else None
            if verdict is None:
                verdict = _classify(gm, mask, *lengths)
                if key is not None:
                    masks[key] = verdict
        except Exception as exc:  # an op the check cannot run: the call keeps its mask
            logger.debug("autokernel: attention mask check failed", exc_info=True)
            verdict = f"the mask could not be computed at compile time ({type(exc).__name__}: {exc})"[:300]
        if isinstance(verdict, str):
            rewrite.reason = verdict
        elif kwargs.get("is_causal"):
            rewrite.reason = "the call passes both attn_mask and is_causal=True"
        else:
            rewrite.kind, rewrite.reason = verdict
            rewrite.status = "rewritten"
            rewrite.args = tuple(node.args[:3])
            rewrite.kwargs = {**kwargs, "attn_mask": None, "is_causal": rewrite.kind == "causal"}
            rewrite.dead = _ancestors(mask)
            _unrepeat_heads(rewrite)
        found.append(rewrite)
    return found


def _unrepeat_heads(rewrite: MaskRewrite) -> None:
    """Key and value both ``repeat_kv(x, n)`` with the same n, up to q's heads: SDPA gets the x's and
    ``enable_gqa=True`` (query head h reads key/value head h // n, which is what the repeat made)."""
    q, k, v = rewrite.args
    if rewrite.kwargs.get("enable_gqa"):
        return
    repeated = [_repeat_kv_source(a) for a in (k, v)]
    if repeated[0] is None or repeated[1] is None or repeated[0][1] != repeated[1][1]:
        return
    (k_src, n, k_chain), (v_src, _, v_chain) = repeated
    q_val = q.meta.get("example_value") if isinstance(q, Node) else None
    kv_heads = k_src.meta["example_value"].shape[1]
    if not isinstance(q_val, torch.Tensor) or q_val.dim() != 4 or q_val.shape[1] != kv_heads * n:
        return
    rewrite.args = (q, k_src, v_src)
    rewrite.kwargs["enable_gqa"] = True
    rewrite.dead |= k_chain | v_chain
    rewrite.gqa = n
    rewrite.reason += f"; key and value heads no longer repeated {n}x (enable_gqa=True)"


def _repeat_kv_source(node: Any) -> tuple[Node, int, set[Node]] | None:
    """``(x, n, the chain's nodes)`` when ``node`` is ``x[:, :, None, :, :].expand(B, KV, n, S, D).reshape(B, KV * n,
    S, D)`` (transformers' ``repeat_kv``) with static sizes, else None."""
    if not (isinstance(node, Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    index = expand.args[0]
    if not (isinstance(index, Node) and index.op == "call_function" and index.target is operator.getitem
            and index.args[1] == _REPEAT_INDEX and isinstance(index.args[0], Node)):
        return None
    source = index.args[0]
    shapes = [n.meta.get("example_value") for n in (source, expand, node)]
    if not all(isinstance(t, torch.Tensor) and all(isinstance(d, int) for d in t.shape) for t in shapes):
        return None
    (b, kv, s, d), repeated, out = (tuple(t.shape) for t in shapes)
    n = repeated[2] if len(repeated) == 5 else 0
    if repeated != (b, kv, n, s, d) or out != (b, kv * n, s, d) or n < 1:
        return None
    return source, n, {node, expand, index}


def apply_mask_rewrites(gm: GraphModule, rewrites: list[MaskRewrite]) -> None:
    """Give each rewritten SDPA call its new arguments, then erase the nodes of the masks (and of the key/value
    repeats) that nothing reads any more. Only those: each was checked free of side effects."""
    dead: set[Node] = set()
    for rewrite in rewrites:
        if rewrite.status != "rewritten":
            continue
        rewrite.sdpa.args = rewrite.args
        rewrite.sdpa.kwargs = rewrite.kwargs
        dead |= rewrite.dead
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node in dead and not node.users:
            graph.erase_node(node)
    graph.lint()


def report_rows(rewrites: Iterable[MaskRewrite]) -> Iterator[dict[str, Any]]:
    """``autokernel.explain``'s fields for each verdict (see ``backend.report.InstanceReport``), lazily: the
    compile-time log asks for them only when it is on."""
    for r in rewrites:
        yield {"pattern": PATTERN, "status": r.status, "reason": r.reason,
               "flags": {**({"mask": r.kind} if r.kind else {}), **({"gqa": r.gqa} if r.gqa else {})},
               "dtype": r.dtype, "shape": r.shape,
               "source": source_line(r.sdpa), "requires_grad": False}


def _seq_len(arg: Any) -> int | None:
    """A query's or key's sequence length when static, else None (the mask is then declined)."""
    value = arg.meta.get("example_value") if isinstance(arg, Node) else None
    n = value.shape[-2] if isinstance(value, torch.Tensor) and value.dim() >= 2 else None
    return n if isinstance(n, int) else None


def _sdpa_kwargs(node: Node) -> dict[str, Any]:
    """The call's arguments after (query, key, value), by name, positional ones included."""
    kwargs = dict(zip(SDPA_PARAMS, node.args[3:], strict=False))
    kwargs.update(node.kwargs)
    return kwargs


def _classify(gm: GraphModule, mask: Any, q_len: int | None, kv_len: int | None) -> tuple[str, str] | str:
    """``(kind, reason)`` when the mask is a constant equal to SDPA's causal mask (for ``q_len`` queries and
    ``kv_len`` keys) or to no mask, else why not."""
    if not isinstance(mask, Node):
        return f"the mask is not a tensor of the graph ({type(mask).__name__})"
    ancestors = _ancestors(mask)
    inputs = sorted((n for n in ancestors if n.op == "placeholder"), key=lambda n: n.name)
    sizes = [n.name for n in inputs if isinstance(n.meta.get("example_value"), torch.SymInt)]
    if sizes:
        return f"the mask has symbolic sizes ({', '.join(sizes[:3])}): its value is not known at compile time"
    if inputs:
        return f"the mask is computed from graph input(s) {', '.join(n.name for n in inputs[:3])}: not a constant"
    for node in ancestors:
        if node.op not in ("call_function", "call_method", "get_attr"):
            return f"the mask is computed by {node.op} {node.target}: not checked"
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            if not all(isinstance(s, int) for s in value.shape):
                return "the mask has symbolic sizes: its value is not known at compile time"
            if value.numel() > MAX_CHECKED_NUMEL:
                return f"{node.name} has {value.numel()} elements: too large to check at compile time"
        mutators = [u for u in node.users if _mutates(u)]
        if mutators:
            return f"{mutators[0].name} changes {node.name} in place"
        if "rand" in str(node.target) or "bernoulli" in str(node.target):
            return f"{node.name} is random"
    if q_len is None or kv_len is None:
        return "the query's or key's sequence length is not a static size"
    value = _evaluate(gm, ancestors, mask)
    if value.dim() < 2 or value.shape[-2] not in (1, q_len) or value.shape[-1] not in (1, kv_len):
        return f"the mask's shape {tuple(value.shape)} does not end in ({q_len}, {kv_len})"
    if value.dtype == torch.bool:
        allowed = value
    elif value.is_floating_point():
        allowed = value == 0
        blocked = value[~allowed]
        if not bool(((blocked == float("-inf")) | (blocked <= torch.finfo(value.dtype).min)).all()):
            return "the float mask holds values other than 0 and -inf (a bias): not a mask of allowed positions"
    else:
        return f"the mask's dtype is {value.dtype}"
    allowed = allowed.expand(*value.shape[:-2], q_len, kv_len)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=value.device).tril()
    if torch.equal(allowed, causal.expand_as(allowed)):
        return "causal", "the mask is the causal one: SDPA's is_causal=True (causal block skipping, no mask read)"
    if bool(allowed.all()):
        return "none", "the mask allows every position: SDPA without a mask"
    return ("the mask is a constant, but neither SDPA's causal mask (top-left aligned) nor all-allowed "
            "(a window, a bottom-right aligned or a block mask)")


def _ancestors(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _mutates(node: Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        # operator.and_ / or_ / not_ end in "_" and make new tensors; torch's in-place functions (relu_) do not.
        name = getattr(node.target, "__name__", "")
        return getattr(node.target, "__module__", "") != "_operator" and name.endswith("_") and not name.endswith("__")
    return False


def _evaluate(gm: GraphModule, ancestors: set[Node], mask: Node) -> torch.Tensor:
    """The mask's value: its nodes copied, in graph order, into a module of their own, and run for real (outside
    any fake mode the compile has active)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    graph = Graph()
    env: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        if node in ancestors:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[mask])
    with unset_fake_temporarily(), torch.no_grad():
        value = GraphModule(gm, graph)()
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the mask evaluated to a {type(value).__name__}")
    return value
