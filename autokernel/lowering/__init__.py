"""Pattern families: one subpackage each, holding its matcher, its ops, its kernels and its tuning problem.

A family is registered here as data; the backend walks :data:`FAMILY_MODULES` in order and the first family
whose matcher claims a node gets it (later families see the node as taken).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Graph, Node

from autokernel.lowering.pattern import Instance


@dataclass(frozen=True)
class Replacement:
    """What stands in the Dynamo graph instead of a pattern instance."""

    op: Any  # an OpOverload of torch.ops.autokernel
    args: tuple[Any, ...]
    output_index: int | None  # the op returns a tuple and the pattern's value is this element
    side_output_indices: dict[str, int] = field(default_factory=dict)  # Instance.side_outputs -> element


@dataclass(frozen=True)
class PatternFamily:
    name: str
    find_instances: Callable[[Graph], list[Instance]]
    pattern_key: Callable[[Instance], str]
    # (instance, its tensor inputs as Dynamo nodes, cache dir, training?) -> the replacement op call
    replacement: Callable[[Instance, dict[str, Node | None], str, bool], Replacement]
    # the tuning problem for ak-tune (imported lazily: the tuner knows nothing of FX)
    problem: Callable[..., Any]


def launches_inline(value: Any) -> bool:
    """Whether an op on this (fake) tensor should be the inline flavour, whose kernels Inductor launches
    itself: on CUDA, not under the Triton interpreter (Inductor cannot trace interpreted kernels), and
    with every size static (an inline op picks its configuration at trace time). Otherwise the opaque
    flavour, which picks it from the actual shape on every call."""
    from autokernel.cache.fingerprint import interpreter_enabled

    return (value.device.type == "cuda" and not interpreter_enabled()
            and all(isinstance(s, int) for s in value.shape))


def inline_suffix(inputs: dict[str, Node | None]) -> str:
    """``"_inline"`` when every tensor input of an op allows the inline flavour (:func:`launches_inline`),
    else ``""`` (the opaque op). Decided on the Dynamo graph's example values, which carry the sizes the
    op is called with: the analysis view's values can be static where Dynamo's are symbolic (seen on CUDA
    with ``dynamic=True``), and an inline op traced with symbolic sizes fails, costing the whole rewrite."""
    import torch

    values = [n.meta.get("example_value") for n in inputs.values() if isinstance(n, Node)]
    values = [v for v in values if isinstance(v, torch.Tensor)]
    return "_inline" if values and all(launches_inline(v) for v in values) else ""


# Subpackages of autokernel.lowering, one per family, in claiming order: a family whose pattern contains
# another's comes first (the loss over an lm_head matmul is not cross_entropy's to take, nor cross-entropy's
# log_softmax softmax's).
FAMILY_MODULES = ("layer_norm", "rms_norm", "linear_cross_entropy", "cross_entropy", "softmax", "swiglu",
                  "rope")


def families() -> dict[str, PatternFamily]:
    import importlib

    modules = [importlib.import_module(f"autokernel.lowering.{name}") for name in FAMILY_MODULES]
    return {m.FAMILY.name: m.FAMILY for m in modules}
