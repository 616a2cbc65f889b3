"""The ``autokernel`` torch.compile backend.

For each Dynamo graph: hand SDPA the attention masks that are constants as what they are
(``attention_mask.py``: a causal mask becomes ``is_causal=True``), build the aten analysis view, let
every pattern family find its instances, look each one up in the per-GPU cache, rewrite the hits into
``torch.ops.autokernel`` calls, record the misses in the wanted table, and hand the graph to Inductor's
``compile_fx`` (which runs AOTAutograd itself; wrapping it again would trace twice). Anything that goes
wrong in our part is logged and the untouched graph goes to Inductor: a model never fails because of
autokernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule

from autokernel.backend.attention_mask import apply_mask_rewrites, find_mask_rewrites, report_rows
from autokernel.backend.options import Options, parse_options
from autokernel.backend.plan import apply_plan, plan_graph
from autokernel.backend.report import InstanceReport, Report

logger = logging.getLogger("autokernel")

# While autokernel.explain runs, graphs are planned but not rewritten, and reported here.
_explaining: contextvars.ContextVar[Report | None] = contextvars.ContextVar("autokernel_explain", default=None)


def _compile(gm: GraphModule, example_inputs: list[Any], opts: Options) -> Callable:
    if opts.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=dict(opts.inductor))


def _log(reports: Iterable[InstanceReport]) -> None:
    """One line per instance (pattern, status, dtype, shape, source, reason); ``reports`` is only consumed (its
    source lines parsed) when INFO is on."""
    if not logger.isEnabledFor(logging.INFO):
        return
    for r in reports:
        logger.info("autokernel: %s %s %s %s at %s: %s", r.pattern, r.status, r.dtype,
                    "x".join(map(str, r.shape)), r.source or "?", r.reason)


def backend(gm: GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """``torch.compile(model, backend="autokernel", mode=..., options=...)``."""
    opts = parse_options(**kwargs)
    report = _explaining.get()
    if report is not None:
        report.graphs += 1
        try:
            if opts.attention_masks:
                report.instances.extend(InstanceReport(report.graphs, **row)
                                        for row in report_rows(find_mask_rewrites(gm)))
            plan = plan_graph(gm, opts, record=False)
            report.instances.extend(InstanceReport.of(report.graphs, i) for i in plan.instances)
        except Exception as exc:
            logger.warning("autokernel: analysis failed, graph left to Inductor", exc_info=True)
            report.errors.append(f"graph {report.graphs}: analysis failed: {exc!r}")
        return gm.forward
    original = None
    if opts.enabled:
        try:
            masks = [m for m in find_mask_rewrites(gm) if m.status == "rewritten"] if opts.attention_masks else []
            _log(InstanceReport(0, **row) for row in report_rows(masks))
            plan = plan_graph(gm, opts, record=opts.record_misses)
            _log(InstanceReport.of(0, i) for i in plan.instances)
            if plan.rewrites or masks:
                original = _snapshot(gm)
                apply_mask_rewrites(gm, masks)
                apply_plan(gm, plan, opts)
                gm.recompile()
        except Exception:
            logger.warning("autokernel: analysis or rewrite failed, graph left to Inductor as is", exc_info=True)
            if original is not None:  # the mask rewrites were applied: compile the graph as Dynamo made it
                gm = original
            original = None
    try:
        return _compile(gm, example_inputs, opts)
    except Exception:
        # Inline ops are traced into Inductor's code, so a cached kernel that does not build fails here.
        if original is None:
            raise
        logger.warning("autokernel: compiling the graph with our kernels failed; compiling it without them",
                       exc_info=True)
        return _compile(original, example_inputs, opts)


def _snapshot(gm: GraphModule) -> GraphModule:
    """A copy of ``gm``'s graph (nodes and their meta) over the same module attributes: cheap, no tensors."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    snapshot = GraphModule(gm, graph)
    snapshot.meta.update(gm.meta)
    return snapshot


@contextlib.contextmanager
def _collect(report: Report) -> Iterator[None]:
    token = _explaining.set(report)
    try:
        yield
    finally:
        _explaining.reset(token)


def explain(model_or_fn: Callable, *inputs: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Run ``model_or_fn(*inputs, **kwargs)`` under Dynamo and report every pattern instance.

    Nothing is rewritten or recorded and Inductor does not run: the graphs execute eagerly. Each
    instance says whether the backend would serve it (``hit``), leave it to Inductor because the
    cache has nothing for it (``miss``) or decline it (``declined``, with the reason).
    ``options`` are the backend options (e.g. ``{"autokernel.cache_dir": path}``).
    """
    report = Report()

    def explain_backend(gm: GraphModule, example_inputs: list[Any]) -> Callable:
        return backend(gm, example_inputs, options=options)

    compiled = torch.compile(model_or_fn, backend=explain_backend)
    with _collect(report):
        compiled(*inputs, **kwargs)
    return report
