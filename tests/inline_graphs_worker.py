"""The worker of tests/test_inline_graphs.py (not a test): AOTAutograd's forward and backward graphs of each
inline training op (the ``triton_op`` flavour that Inductor traces through on CUDA), built on the CPU.

    python tests/inline_graphs_worker.py        (with TRITON_INTERPRET unset)

Tracing a ``triton_op`` needs real ``@triton.jit`` functions (the interpreter's cannot be traced, and the
variable must be unset before the kernels' modules are imported, hence a process of its own) and a Triton
target for Inductor's mutation analysis, which compiles each kernel to TTIR: an sm90 target is declared here
(nothing is launched, no GPU is needed). The graphs are captured, not run: each compiled function returns
random tensors of its outputs' shapes, which is all the backward's capture needs.

Each graph is then put through Inductor's post-grad passes (its reinplacing among them), as Inductor does before
it generates code. The last stdout line is a JSON report, one object per op: ``saved_allocations`` (forward nodes
that are bare allocations, ``empty`` and its kin, yet are saved for the backward), ``empty_strided`` (such nodes in
either graph) and ``copies`` (``clone``/``copy_`` nodes left after the post-grad passes: on a GPU, each a kernel
that copies a whole tensor). Under ``"steps"``, the same for whole training steps of 2-layer transformers models
(:data:`STEPS`: tests/test_model_families.py's models, with SDPA and with eager attention), each compiled by the
autokernel backend with every miss served and the inline ops as on CUDA, and by Inductor alone: each one's
``copies`` (name, shape) and ``kernels`` (our Triton launches in its graphs: proof that the rewrites happened).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._guards import detect_fake_mode
from torch._inductor.fx_passes.post_grad import post_grad_passes
from torch._inductor.virtualized import V
from triton.backends.compiler import GPUTarget


class _Sm90Driver:
    """The one thing the TTIR build asks of a driver."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90Driver())

import autokernel.lowering.cross_entropy.ops  # noqa: E402, F401  (each module defines its ops)
import autokernel.lowering.layer_norm.ops  # noqa: E402, F401
import autokernel.lowering.rms_norm.ops  # noqa: E402, F401
import autokernel.lowering.rope.ops  # noqa: E402, F401
import autokernel.lowering.softmax.ops  # noqa: E402, F401
import autokernel.lowering.swiglu.ops  # noqa: E402, F401

aten = torch.ops.aten
# (family, attention) of the model-level steps.
STEPS = {"llama_sdpa": ("llama", "sdpa"), "llama_eager": ("llama", "eager"), "gpt_neox_sdpa": ("gpt_neox", "sdpa"),
         "gpt_neox_eager": ("gpt_neox", "eager")}
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_permuted.default,
               aten.new_empty.default, aten.new_empty_strided.default, aten.empty_like.default}


def cases(cache_dir: str) -> dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...]]]:
    ak = torch.ops.autokernel
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    f32 = torch.float32
    return {
        "rms_norm": (lambda x, w: ak.rms_norm_train_inline(x, w, 1e-6, 0.0, "llama", f32, cache_dir),
                     (r(8, 32), r(32))),
        "add_rms_norm": (lambda x, res, w: ak.add_rms_norm_train_inline(x, res, w, 1e-6, 0.0, "llama", f32,
                                                                        cache_dir), (r(8, 32), r(8, 32), r(32))),
        "layer_norm": (lambda x, w, b: ak.layer_norm_train_inline(x, w, b, 1e-5, 1, "fp32", f32, cache_dir),
                       (r(8, 32), r(32), r(32))),
        "softmax": (lambda x: ak.softmax_train_inline(x, False, f32, cache_dir), (r(8, 32),)),
        "swiglu": (lambda x, up: ak.swiglu_train_inline(x, up, "silu", "separate", cache_dir), (r(8, 32), r(8, 32))),
        "cross_entropy": (lambda x, y: ak.cross_entropy_train_inline(x, y, -100, 0.0, "mean", f32, cache_dir),
                          (r(8, 32), torch.randint(0, 32, (8,), generator=g))),
        # q and k as models pass them: transposed [B, S, H, D] views (GQA: k with fewer heads).
        "rope": (lambda q, k, c, s: ak.rope_train_inline(q.transpose(1, 2), k.transpose(1, 2), c.unsqueeze(1),
                                                          s.unsqueeze(1), "half", 32, f32, True, True, cache_dir),
                 (r(1, 16, 4, 32), r(1, 16, 2, 32), r(1, 16, 32, grad=False), r(1, 16, 32, grad=False))),
    }


def _stand_in(gm: torch.fx.GraphModule) -> Callable[..., list[torch.Tensor | None]]:
    """Random tensors shaped and strided as ``gm``'s outputs (integers zero), in place of running it."""
    vals = [o.meta["val"] if isinstance(o, torch.fx.Node) else None for o in gm.graph.output_node().args[0]]

    def run(*_: Any) -> list[torch.Tensor | None]:
        return [None if v is None else torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).normal_()
                if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype) for v in vals]
    return run


def capturing(on_graph: Callable[[str, torch.fx.GraphModule, Any], None]) -> Callable[..., Any]:
    """A ``torch.compile`` backend that hands each forward and backward graph (``kind`` "fw" or "bw") to
    ``on_graph`` and runs :func:`_stand_in` in its place; Inductor's partitioner, so that what is saved is what
    Inductor would be handed."""
    def compiler(kind: str) -> Callable[..., Any]:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
            on_graph(kind, gm, example_inputs)
            return _stand_in(gm)
        return compile_graph
    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"),
                        partition_fn=min_cut_rematerialization_partition)


def post_grad_copies(gm: torch.fx.GraphModule, example_inputs: Any, kind: str) -> list[list[Any]]:
    """Run Inductor's post-grad passes on ``gm`` (as Inductor does before generating code) and list the copies
    left: ``[kind:name, shape]``."""
    with V.set_fake_mode(detect_fake_mode(example_inputs)):
        post_grad_passes(gm, is_inference=False)
    return [[f"{kind}:{n.name}", list(n.meta["val"].shape)] for n in gm.graph.nodes
            if n.target in (aten.clone.default, aten.copy_.default)]


def facts_of(fn: Callable[..., Any], args: tuple[torch.Tensor, ...]) -> dict[str, list[str]]:
    facts: dict[str, list[str]] = {"graphs": [], "saved_allocations": [], "empty_strided": [], "copies": []}

    def on_graph(kind: str, gm: torch.fx.GraphModule, example_inputs: Any) -> None:
        facts["graphs"].append(kind)
        if kind == "fw":
            facts["saved_allocations"] = [n.name for n in gm.graph.output_node().args[0]
                                          if isinstance(n, torch.fx.Node) and n.target in ALLOCATIONS]
        facts["empty_strided"] += [f"{kind}:{n.name}" for n in gm.graph.nodes if n.target is aten.empty_strided.default]
        facts["copies"] += [name for name, _ in post_grad_copies(gm, example_inputs, kind)]

    torch._dynamo.reset()
    out = torch.compile(fn, backend=capturing(on_graph), fullgraph=True)(*args)
    diff = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
    torch.autograd.backward(diff, [torch.randn_like(o) for o in diff])
    return facts


def force_cuda_choices() -> None:
    """On the CPU the backend declines our kernels, or takes the opaque ops under the interpreter: make the choices
    it makes on CUDA (kernels allowed, inline ops where sizes are static)."""
    import importlib

    import autokernel.lowering

    importlib.import_module("autokernel.backend.plan").kernels_can_run_on = lambda device: True
    autokernel.lowering.launches_inline = lambda value: all(isinstance(d, int) for d in value.shape)


def step_copies(family: str, attention: str, cache_dir: str) -> dict[str, Any]:
    """The copies in a training step of ``family``'s model under autokernel and under Inductor (module docstring;
    :func:`force_cuda_choices` first)."""
    import importlib

    from models import serve_every_miss
    from test_model_families import _family_model

    backend_module = importlib.import_module("autokernel.backend")
    found = {impl: {"copies": [], "kernels": 0} for impl in ("misses", "autokernel", "inductor")}

    def recorder(impl: str) -> Callable[..., Any]:
        def on_graph(kind: str, gm: torch.fx.GraphModule, example_inputs: Any) -> None:
            found[impl]["kernels"] += sum(n.target is torch.ops.higher_order.triton_kernel_wrapper_functional
                                          for n in gm.graph.nodes)
            found[impl]["copies"] += post_grad_copies(gm, example_inputs, kind)
        return capturing(on_graph)

    model, ids = _family_model(family, attention)
    model = model.to(torch.bfloat16)
    options = {"autokernel.cache_dir": cache_dir}

    def step(impl: str, fn: Callable[..., Any]) -> None:
        torch._dynamo.reset()
        backend_module._compile = lambda gm, example_inputs, opts: recorder(impl)(gm, example_inputs)
        fn(input_ids=ids, labels=ids).loss.backward()

    step("misses", torch.compile(model, backend="autokernel", options=options))
    serve_every_miss(cache_dir, "cpu")
    step("autokernel", torch.compile(model, backend="autokernel", options=options))
    step("inductor", torch.compile(model, backend=recorder("inductor")))
    return {impl: found[impl] for impl in ("autokernel", "inductor")}


def main() -> None:
    cache_dir = tempfile.mkdtemp(prefix="ak-inline-graphs-")
    report: dict[str, Any] = {name: facts_of(fn, args) for name, (fn, args) in cases(cache_dir).items()}
    sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py, tests/test_model_families.py
    force_cuda_choices()
    report["steps"] = {name: step_copies(family, attention, tempfile.mkdtemp(prefix=f"ak-{name}-"))
                       for name, (family, attention) in STEPS.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
