"""Finding the gated MLP activation ``act(gate) * up`` in the aten analysis graph.

The spellings and the aten ops they reach (only the elementwise part is ours; the matmuls that make
gate and up stay Inductor's):

- ``F.silu(gate) * up``, ``up * F.silu(gate)``, ``nn.SiLU()(gate) * up``, HF ``ACT2FN["silu"]``
  -> ``mul(silu(gate), up)``                                                   act ``silu``
- ``gate * torch.sigmoid(gate) * up`` (silu by hand)
  -> ``mul(mul(gate, sigmoid(gate)), up)``                                     act ``silu``
- ``F.gelu(gate) * up``, HF ``ACT2FN["gelu"]`` -> ``mul(gelu(gate), up)``       act ``gelu``
- ``F.gelu(gate, approximate="tanh") * up``, HF ``ACT2FN["gelu_pytorch_tanh"]``  act ``gelu_tanh``
- ``gate, up = x.chunk(2, dim=-1)`` or ``x.split(H, -1)`` (also ``up, gate = ...``): gate and up are
  ``getitem``s of one ``split`` into two equal halves of the last dim -> layout ``gate_up`` / ``up_gate``:
  the kernels read the halves in place and the backward writes one gradient of ``x``.

Declined with a reason (never rewritten): other activations (relu, sigmoid alone, tanh, HF's decomposed
"gelu_new", ...), gate and up of different shapes (broadcasting) or dtypes, intermediates used
elsewhere (``act(gate)`` read again), gate and up the same tensor.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autokernel.lowering.pattern import Alt, Instance, Op, Var, aten, decline, dtype_name, match, node_val
from autokernel.lowering.swiglu.ops import PATTERN

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

G, U = Var("gate"), Var("up")
ACT = Alt((
    Op((aten.silu,), (G,), name="act"),
    Op((aten.gelu,), (G,), name="act"),
    Op((aten.mul,), (G, Op((aten.sigmoid,), (G,))), name="act", commutative=True),
))
SWIGLU = Op((aten.mul,), (ACT, U), name="out", commutative=True)
# Gated products with an activation we have no kernel for: found only to say why they stay Inductor's.
OTHER_ACTS = (aten.relu, aten.sigmoid, aten.tanh, aten.elu, aten.leaky_relu, aten.hardswish, aten.hardsigmoid,
              aten.hardtanh, aten.mish, aten.softplus, aten.selu, aten.celu, aten.relu6)
OTHER = Op((aten.mul,), (Op(OTHER_ACTS, (G,), name="act"), U), name="out", commutative=True)
SPLITS = (aten.split, aten.split_with_sizes)


def _act_name(act: Node) -> str:
    packet = act.target.overloadpacket
    if packet is aten.silu or packet is aten.mul:
        return "silu"
    if packet is aten.gelu:
        approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu" if approximate == "none" else f"gelu({approximate})"
    return packet.__name__


def _halves(gate: Node, up: Node) -> tuple[Node, Node, str] | None:
    """(split, x, layout) when gate and up are the two halves of one tensor's last dim, else None (other
    pieces of one tensor, of equal shapes, are served as two tensors: the views)."""
    if not all(isinstance(n, Node) and n.target is operator.getitem for n in (gate, up)):
        return None
    split = gate.args[0]
    if split is not up.args[0] or not (isinstance(split, Node) and split.op == "call_function"
                                       and getattr(split.target, "overloadpacket", None) in SPLITS):
        return None
    x = split.args[0]
    rank = node_val(x).dim()
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % rank != rank - 1 or len(node_val(split)) != 2:
        return None
    return split, x, "gate_up" if gate.args[1] == 0 else "up_gate"


def _check(root: Node, b) -> Instance:
    gate, up, act = b["gate"], b["up"], b["act"]
    gv, uv, outv = node_val(gate), node_val(up), node_val(root)
    name = _act_name(act)
    inst = Instance(
        pattern=PATTERN, root=root, nodes=b.nodes, inputs={"gate": gate, "up": up},
        params={"act": name, "layout": "separate"}, flags={"act": name, "layout": "separate"},
        dtype=dtype_name(gv.dtype) if isinstance(gv, torch.Tensor) else "?",
        shape=tuple(gv.shape) if isinstance(gv, torch.Tensor) else (), requires_grad=False,
    )
    if not (isinstance(gv, torch.Tensor) and isinstance(uv, torch.Tensor)) or gv.dim() < 1:
        return decline(inst, "gate and up are not both tensors of rank >= 1")
    if name not in ("silu", "gelu", "gelu_tanh"):
        return decline(inst, f"activation {name} (supported: silu, gelu, gelu tanh)")
    if gate is up:
        return decline(inst, "gate and up are the same tensor")
    if gv.dtype not in FLOATS:
        return decline(inst, f"gate dtype {gv.dtype} (supported: fp32, fp16, bf16)")
    if uv.dtype != gv.dtype or outv.dtype != gv.dtype:
        return decline(inst, f"gate {dtype_name(gv.dtype)} and up {dtype_name(uv.dtype)} differ in dtype")
    # statically_known_true: comparing symbolic sizes with == would install a guard.
    if gv.dim() != uv.dim() or not all(statically_known_true(a == c) for a, c in zip(gv.shape, uv.shape,
                                                                                      strict=True)):
        return decline(inst, f"gate {tuple(gv.shape)} and up {tuple(uv.shape)} differ in shape (broadcasting)")
    if gv.device != uv.device:
        return decline(inst, "gate and up are on different devices")
    halves = _halves(gate, up)
    if halves is not None:
        split, x, layout = halves
        fused = Instance(
            pattern=PATTERN, root=root, nodes=b.nodes + (gate, up, split), inputs={"x": x},
            params={"act": name, "layout": layout}, flags={"act": name, "layout": layout},
            dtype=inst.dtype, shape=inst.shape, requires_grad=False,
        )
        # Halves read elsewhere too: serve them as two tensors (the views), Inductor joins the gradients.
        if _outside_users(fused) is None:
            return fused
    inst.status = "miss"
    return inst


def _outside_users(inst: Instance) -> str | None:
    inside = set(inst.nodes)
    for node in inst.nodes:
        if node is inst.root:
            continue
        for user in node.users:
            # Dead nodes don't count (the analysis view is not dead-code eliminated).
            if user not in inside and (user.users or user.op != "call_function"):
                return f"intermediate {node.name} is also used by {user.name}"
    return None


def find_instances(graph: Graph) -> list[Instance]:
    """Every gated activation in ``graph``, accepted or declined with a reason."""
    out: list[Instance] = []
    claimed: set[Node] = set()
    for root in reversed(list(graph.nodes)):
        if root.op != "call_function" or root in claimed or not root.users:
            continue
        first_decline = None
        for pattern in (SWIGLU, OTHER):
            for b in match(pattern, root):
                if claimed.intersection(b.nodes):
                    continue
                if not isinstance(b["up"], Node) or (pattern is OTHER and b["gate"] is b["up"]):
                    continue  # act(x) * 2.0, x * sigmoid(x): not a gated product
                inst = _check(root, b)
                if inst.status != "declined":
                    problem = _outside_users(inst)
                    if problem:
                        decline(inst, problem)
                if inst.status == "declined":
                    first_decline = first_decline or inst
                    continue
                out.append(inst)
                claimed.update(inst.nodes)
                break
            else:
                continue
            break
        else:
            if first_decline is not None and not claimed.intersection(first_decline.nodes):
                out.append(first_decline)
                # One near-miss is reported once, at its outermost spelling.
                claimed.update(first_decline.nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(out, key=lambda i: order[i.root])
