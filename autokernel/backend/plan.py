"""Deciding, for one Dynamo graph, which pattern instances our kernels serve, and rewriting them.

``plan_graph`` does everything that can fail (analysis view, matching, cache lookups, mapping each
instance back to Dynamo nodes) without touching the graph; ``apply_plan`` runs the replacements' fake
kernels, and only then edits the graph in place (insert, redirect uses, erase), so a failure anywhere
leaves the user's graph as Dynamo made it.
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from autokernel.backend.analysis import AnalysisView, build_analysis_view, source_line
from autokernel.backend.options import Options
from autokernel.cache import KernelCache, fingerprint, kernels_can_run_on, row_bucket, runtime, tuned_passes
from autokernel.lowering import PatternFamily, families
from autokernel.lowering.pattern import Instance, decline, graph_input_reason, is_graph_input, node_val, size_hint

logger = logging.getLogger("autokernel")


@dataclass
class Rewrite:
    family: PatternFamily
    instance: Instance
    # Every Dynamo node holding the value the replacement provides (see _Region.root_holders)
    root_holders: tuple[Node, ...]
    nodes: set[Node]  # the Dynamo nodes the replacement makes dead
    inputs: dict[str, Node | None]  # the op's tensor inputs, as Dynamo nodes
    train: bool
    # Instance.side_outputs, as the Dynamo nodes holding each value (no-op casts make several)
    side_roots: dict[str, tuple[Node, ...]] = field(default_factory=dict)
    # Where the op goes when not before its first output: right after this input (see _dynamo_region)
    after: Node | None = None

    @property
    def root(self) -> Node:
        """The last holder of the output's value: where the rewrite is ordered and whose metadata it copies."""
        return self.root_holders[-1]


@dataclass
class GraphPlan:
    instances: list[Instance] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)


@dataclass
class _Region:
    # The Dynamo nodes holding the output's value: the one that computes it, then the no-op casts after it,
    # which may be the pattern's own (``.type_as(x)`` of a float32 x) or already the reader's (the ``x.float()``
    # a norm after RoPE begins with); readers of any of them read the op's output instead.
    root_holders: tuple[Node, ...]
    nodes: set[Node]
    inputs: dict[str, Node | None]
    side_roots: dict[str, tuple[Node, ...]]
    after: Node | None = None


def _dynamo_region(view: AnalysisView, inst: Instance) -> _Region | str:
    """The Dynamo nodes behind an aten match, or why the match cannot be cut out of the Dynamo graph."""
    nodes = view.dynamo_nodes_of(inst.nodes)
    matched = set(inst.nodes)
    for d in nodes:
        # Unused outputs (rstd of a fused op nobody reads) don't count: the rewrite drops them.
        extra = [a for a in view.created.get(d, [])
                 if a not in matched and a.users and isinstance(node_val(a), torch.Tensor)]
        if extra:
            return f"{d.name} computes more than the pattern ({extra[0].name})"
    position = _position(next(iter(nodes)).graph)
    provided: dict[str, tuple[Node, ...]] = {}
    for name, aten_node in (("output", inst.root), *inst.side_outputs.items()):
        # Several Dynamo nodes hold a value when no-op casts follow it; the op's output replaces them all.
        holders = tuple(sorted((d for d in nodes if view.output_of.get(d) is aten_node), key=position))
        if not holders:
            return f"the pattern's {name} is not the value of a Dynamo node"
        provided[name] = holders
    root_holders = provided.pop("output")
    side = {d for holders in provided.values() for d in holders}
    for d in nodes:
        if d in root_holders or d in side:
            continue
        outside = [u for u in d.users if u not in nodes]
        if outside:
            return f"intermediate {d.name} is also used by {outside[0].name}"
    inputs: dict[str, Node | None] = {}
    for name, a in inst.inputs.items():
        if a is None:
            inputs[name] = None
            continue
        d = view.producer.get(a)
        if d is None or d in nodes:
            return f"input {name} is not the value of a Dynamo node outside the pattern"
        inputs[name] = d
    # The op goes where its first output was. When an input is computed later (HF's loss shifts the labels after
    # the lm_head whose logits the op also returns), it goes right after the last input instead, provided that
    # no node outside the pattern reads one of its outputs before then.
    first = min([*root_holders, *side], key=position)
    given = [(name, d) for name, d in inputs.items() if d is not None]
    last = max(given, key=lambda item: position(item[1]), default=None)
    after = None
    if last is not None and position(last[1]) > position(first):
        early = [u for d in (*root_holders, *side) for u in d.users
                 if u not in nodes and position(u) <= position(last[1])]
        if early:
            return f"input {last[0]} is computed after {early[0].name} reads the pattern's output"
        after = last[1]
    return _Region(root_holders, nodes, inputs, provided, after)


def _shape_numbers(shape: tuple[Any, ...]) -> tuple[int, int, list[int]]:
    hints = [size_hint(s) for s in shape]
    hidden = hints[-1] if hints else 1
    rows = 1
    for h in hints[:-1]:
        rows *= h
    return hidden, rows, hints


def plan_graph(gm: GraphModule, opts: Options, record: bool) -> GraphPlan:
    plan = GraphPlan()
    view = build_analysis_view(gm)
    runtime.invalidate(opts.cache_dir)  # ak-tune may have written since the last compile
    caches: dict[str, KernelCache] = {}
    claimed: set[Node] = set()
    for family in families().values():
        for inst in family.find_instances(view.aten.graph):
            if claimed.intersection(inst.nodes):
                continue
            origin = view.origin.get(inst.root)
            inst.source = source_line(origin) if origin is not None else ""
            plan.instances.append(inst)
            if inst.status == "declined":
                continue
            dynamic = sorted(name for name, value in inst.params.items() if is_graph_input(value))
            if dynamic:
                # A kernel bakes its scalars in (and the cache key holds some): a value read at run time
                # cannot be served, and the analysis view's stand-in for it must never reach a kernel.
                inst.flags = {k: ("graph input" if is_graph_input(v) else v) for k, v in inst.flags.items()}
                decline(inst, graph_input_reason(dynamic))
                continue
            # The family owns these nodes from here on, hit or miss: a later family matching part of
            # them (softmax inside cross-entropy's log_softmax) neither takes nor reports them.
            claimed.update(inst.nodes)
            x = node_val(inst.inputs.get("x")) if inst.inputs.get("x") is not None else node_val(inst.root)
            device = x.device
            if not kernels_can_run_on(device):
                inst.status, inst.reason = "declined", f"tensors on {device.type} (kernels run on CUDA)"
                continue
            region = _dynamo_region(view, inst)
            if isinstance(region, str):
                inst.status, inst.reason = "declined", region
                # A smaller pattern inside this one may still be cut out (the cross-entropy of a linear +
                # cross-entropy): the nodes go back to the later families.
                claimed.difference_update(inst.nodes)
                continue
            example = region.root_holders[-1].meta.get("example_value")
            train = bool(getattr(example, "requires_grad", False))
            inst.requires_grad = train
            key = family.pattern_key(inst)
            hidden, rows, hints = _shape_numbers(inst.shape)
            entry = runtime.lookup(opts.cache_dir, device, key, hidden, rows)
            passname = "train" if train else "fwd"
            fp = fingerprint(device)
            wanted = (family.name, key, inst.flags, inst.dtype, hints, hidden, rows, train)
            if entry is None or passname not in tuned_passes(entry):
                inst.status = "miss"
                inst.reason = (f"no tuned kernel for {key} H={hidden} rows~{row_bucket(rows)} on {fp}" if entry is None
                               else f"the kernel for {key} H={hidden} rows~{entry['row_bucket']} on {fp} was tuned "
                                    f"for {'+'.join(tuned_passes(entry))} only, not {passname}")
                if record:
                    _record_wanted(caches, opts.cache_dir, fp, wanted)
                continue
            # Another row bucket's entry decides this shape (a decode step served by the prefill's kernel): it is
            # served, or declined, by that entry, and its own bucket is recorded as wanted so ak-tune tunes it.
            neighbour = (f" (the nearest tuned bucket, rows~{entry['row_bucket']}; rows~{row_bucket(rows)} "
                         "recorded as wanted)") if entry["row_bucket"] != row_bucket(rows) else ""
            if neighbour and record:
                _record_wanted(caches, opts.cache_dir, fp, wanted)
            if entry["winner"][passname] != "autokernel":
                inst.status = "declined"
                inst.reason = f"tuned: Inductor is faster for {passname} at this shape{neighbour}"
                continue
            problem = _verification_problem(entry, device)
            if problem:
                inst.status, inst.reason = "declined", f"cache entry failed AUTOKERNEL_VERIFY: {problem}"
                continue
            inst.status = "hit"
            raced = "" if entry.get("raced", True) else " (interpreter entry, not raced against Inductor)"
            inst.reason = f"tuned {entry['producer'].get('strategy', '?')} kernel, {passname}{raced}{neighbour}"
            plan.rewrites.append(Rewrite(family, inst, region.root_holders, region.nodes, region.inputs, train,
                                         region.side_roots, region.after))
    for cache in caches.values():
        cache.close()
    return plan


def _record_wanted(caches: dict[str, KernelCache], cache_dir: Any, fp: str, wanted: tuple) -> None:
    """Record one sighting in the wanted table of ``fp`` (``KernelCache.record_wanted``'s arguments); a cache
    that cannot be written costs a warning, never the compile."""
    cache = caches.setdefault(fp, KernelCache(cache_dir, fingerprint_=fp))
    try:
        cache.record_wanted(*wanted)
    except Exception as exc:
        logger.warning("autokernel: could not record a miss in %s: %s", cache.path, exc)


_verified: dict[tuple[str, float], str | None] = {}  # (entry key, created) -> what failed, or None


def _verification_problem(entry: dict[str, Any], device: torch.device) -> str | None:
    """With ``AUTOKERNEL_VERIFY=1``, each entry's kernel is rechecked against the reference once per process
    before it is first served; a failure is logged and the instance stays with Inductor."""
    if os.environ.get("AUTOKERNEL_VERIFY", "0") in ("", "0"):
        return None
    key = (f"{entry['pattern_key']}/H={entry['hidden']}/R={entry['row_bucket']}", entry["created"])
    if key not in _verified:
        from autokernel.playbook.tuner import verify_entry

        try:
            verify_entry(entry, device)
            _verified[key] = None
            logger.info("autokernel: verified the cache entry %s", key[0])
        except Exception as exc:
            _verified[key] = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("autokernel: cache entry %s failed verification (%s); left to Inductor", key[0],
                           _verified[key])
    return _verified[key]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def apply_plan(gm: GraphModule, plan: GraphPlan, opts: Options) -> None:
    """Rewrite ``gm`` in place. Every step that can fail (building the replacements, running their fake
    kernels) happens before the first mutation, so a failure leaves the graph as Dynamo made it."""
    staged = []
    for rw in plan.rewrites:
        rep = rw.family.replacement(rw.instance, rw.inputs, opts.cache_dir, rw.train)
        example_args = [a.meta["example_value"] if isinstance(a, Node) else a for a in rep.args]
        # The example values' own mode: TracingContext's fake mode is another one during compile.
        fake_mode = next(a.fake_mode for a in example_args if isinstance(a, torch.Tensor))
        # Identity saved-tensor hooks: a user's own (activation offloading, say) would otherwise pack the fake
        # tensors the training op saves here, and fail on them.
        with fake_mode, torch.autograd.graph.saved_tensors_hooks(_same, _same):
            result = rep.op(*example_args)
        staged.append((rw, rep, result))
    graph = gm.graph
    replaced: dict[Node, Node] = {}  # an instance's input may be another instance's (erased) output
    for rw, rep, result in sorted(staged, key=lambda s: _position(graph)(s[0].root)):
        args = tuple(replaced.get(a, a) if isinstance(a, Node) else a for a in rep.args)
        provided = [(rw.root_holders, rep.output_index)] + [(rw.side_roots[name], index)
                                                      for name, index in rep.side_output_indices.items()]
        if rw.after is not None:
            # Before the node that follows it (inserting_after would put each new node ahead of the last one).
            place = graph.inserting_before(replaced.get(rw.after, rw.after).next)
        else:
            place = graph.inserting_before(min((d for ds, _ in provided for d in ds), key=_position(graph)))
        with place:
            call = graph.call_function(rep.op, args)
            call.meta["example_value"] = result
            values = []
            for old_nodes, index in provided:
                value = call
                if index is not None:
                    value = graph.call_function(operator.getitem, (call, index))
                    value.meta["example_value"] = result[index]
                values.append((old_nodes, value))
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in rw.root.meta:
                for node in (call, *(v for _, v in values)):
                    node.meta[key] = rw.root.meta[key]
        for old_nodes, value in values:
            for old_node in old_nodes:
                old_node.replace_all_uses_with(value)
                replaced[old_node] = value
        for d in sorted(rw.nodes, key=_position(graph), reverse=True):
            graph.erase_node(d)
    graph.lint()


def _position(graph: Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]
