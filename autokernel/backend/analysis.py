"""The analysis view: the Dynamo graph traced to aten, with provenance back to Dynamo nodes.

Matchers read aten because there every spelling collapses to few ops (``.float()``, ``.to()`` and
``type_as`` all become ``_to_copy``; ``F.rms_norm`` decomposes into pow/mean/add/rsqrt/mul). The
trace uses an EMPTY decomposition table, so only CompositeImplicit ops decompose, and runs under
no_grad so autograd leaves no ``detach`` nodes behind. The rewrite, though, happens on the Dynamo
graph, so while tracing we record for every Dynamo node which aten nodes it produced and which aten
node holds its output.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, make_fx

from autokernel.lowering.pattern import DYNAMIC_SCALAR


@dataclass
class AnalysisView:
    aten: GraphModule
    created: dict[Node, list[Node]] = field(default_factory=dict)  # dynamo node -> aten nodes it made
    output_of: dict[Node, Node] = field(default_factory=dict)  # dynamo node -> aten node of its output
    origin: dict[Node, Node] = field(default_factory=dict)  # aten node -> dynamo node that made it
    producer: dict[Node, Node] = field(default_factory=dict)  # aten node -> a dynamo node whose output it is
    fake_mode: Any = None

    def dynamo_nodes_of(self, aten_nodes: tuple[Node, ...]) -> set[Node]:
        """The Dynamo nodes that made these aten nodes, plus the no-op ones whose value is one of them
        (``h.to(torch.float32)`` on a float32 ``h`` makes no aten node: it returns ``h`` itself)."""
        inside = set(aten_nodes)
        made = {self.origin[n] for n in aten_nodes if n in self.origin}
        aliases = {d for d, a in self.output_of.items()
                   if a in inside and d.op in ("call_function", "call_method") and not self.created.get(d)}
        return made | aliases


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, view: AnalysisView):
        super().__init__(gm)
        self.view = view

    def run_node(self, n: Node) -> Any:
        tracer = get_proxy_mode().tracer
        graph = tracer.graph
        last = graph._root.prev
        if n.op == "call_method" and n.target == "item":
            # A Python scalar Dynamo made a graph input (dynamic=True does this to float attributes such
            # as eps): tracing .item() would need its value. A marker value stands in for it, so that a
            # matcher binding it as a constant can see that it is none and decline.
            result = DYNAMIC_SCALAR
        else:
            result = super().run_node(n)
        made = []
        node = graph._root.prev
        while node is not last:
            made.append(node)
            node = node.prev
        made.reverse()
        self.view.created[n] = made
        for a in made:
            self.view.origin[a] = n
        if isinstance(result, torch.Tensor):
            slot = get_proxy_slot(result, tracer, None)
            if slot is not None:
                out = slot.proxy.node
                self.view.output_of[n] = out
                self.view.producer.setdefault(out, n)
        return result


def build_analysis_view(gm: GraphModule) -> AnalysisView:
    """Trace ``gm`` (a Dynamo graph) to aten over its placeholders' fake example values."""
    fakes = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if "example_value" not in node.meta:
                raise RuntimeError(f"placeholder {node.name} has no example_value")
            fakes.append(node.meta["example_value"])
    fake_mode = detect_fake_mode(fakes)
    view = AnalysisView(aten=None)  # type: ignore[arg-type]
    recorder = _Recorder(gm, view)
    with torch.no_grad():
        view.aten = make_fx(recorder.run, decomposition_table={}, tracing_mode="fake")(*fakes)
    view.fake_mode = fake_mode
    # make_fx names its placeholders itself; tie them to Dynamo's by position.
    dyn_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    aten_ph = [n for n in view.aten.graph.nodes if n.op == "placeholder"]
    for d, a in zip(dyn_ph, aten_ph, strict=True):
        view.output_of[d] = a
        view.producer[a] = d
        view.origin[a] = d
    return view


def source_line(node: Node) -> str:
    """Where the user's code made ``node``: ``file.py:123 in fn: code`` for the innermost frame outside
    torch itself, or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = []
    for i, line in enumerate(lines):
        found = _FRAME.match(line)
        if found:
            code = lines[i + 1] if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
            where = f"{os.path.basename(found['file'])}:{found['line']} in {found['fn']}"
            frames.append((found["file"], f"{where}: {code}"))
    torch_dir = os.path.dirname(torch.__file__)
    for path, text in reversed(frames):
        if not path.startswith(torch_dir):
            return text
    return frames[-1][1] if frames else ""


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')
