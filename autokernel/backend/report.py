"""``autokernel.explain``: what the backend would do with each pattern instance, as a table and as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autokernel.lowering.pattern import Instance


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "x".join(str(s) for s in shape)


@dataclass
class InstanceReport:
    graph: int
    pattern: str
    status: str  # "hit", "miss" or "declined"; an attention mask: "rewritten" or "declined"
    reason: str
    flags: dict[str, Any]
    dtype: str
    shape: tuple[Any, ...]
    source: str
    requires_grad: bool

    @classmethod
    def of(cls, graph: int, inst: Instance) -> InstanceReport:
        shape = tuple(s if isinstance(s, int) else str(s) for s in inst.shape)
        return cls(graph, inst.pattern, inst.status, inst.reason, dict(inst.flags), inst.dtype, shape,
                   inst.source, inst.requires_grad)


@dataclass
class Report:
    graphs: int = 0
    instances: list[InstanceReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.instances:
            out[i.status] = out.get(i.status, 0) + 1
        return out

    def __str__(self) -> str:
        head = ["graph", "pattern", "status", "dtype", "shape", "flags", "source", "reason"]
        rows = [[str(i.graph), i.pattern, i.status, i.dtype, _shape_text(i.shape),
                 ",".join(f"{k}={v}" for k, v in i.flags.items()), i.source, i.reason] for i in self.instances]
        widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(head)]
        widths[6] = min(widths[6], 60)
        lines = [f"autokernel: {self.graphs} graph(s), {len(self.instances)} pattern instance(s) "
                 + " ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))]
        fmt = "  ".join(f"{{:{w}.{w}}}" if c == 6 else f"{{:{w}}}" for c, w in enumerate(widths))
        lines.append(fmt.format(*head))
        lines.extend(fmt.format(*r) for r in rows)
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines)
