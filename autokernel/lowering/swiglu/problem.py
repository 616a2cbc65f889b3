"""The gated MLP activation as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing of the
math; this module knows nothing of the tuner's search or of FX.

The kernel space: both passes are pure streams (forward: read gate and up, write y; backward: read gate,
up and dy, write dgate and dup), already at the DRAM floor in Inductor, so the job is to lose nothing.
What moves the time is bytes in flight per SM: columns per program (``*_block``) and warps per program,
which together set the elements (16-byte vectors) each thread has outstanding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.row_problem import RowProblem, problem_dtype
from autokernel.lowering.swiglu.kernels import (
    ACTS,
    LAYOUTS,
    SourceKernels,
    SwigluConfig,
    default_config,
    swiglu_bwd,
    swiglu_fwd,
    swiglu_reference,
)
from autokernel.lowering.swiglu.ops import BWD_KERNEL, FWD_KERNEL, PATTERN, pattern_key, source_kernels

# fp16 tops out at 65504: a gate of 1e4 times a unit up (and dy) would overflow the outputs themselves, so
# its "large" case stops at a gate of 1e2, where the sigmoid has long saturated.
_FP16_MAX_SCALE = 1e2


@dataclass
class Case:
    x: torch.Tensor  # gate, or gate and up as the halves of the last dim
    up: torch.Tensor | None
    dy: torch.Tensor


class SwigluProblem(RowProblem):
    """One (variant, shape) to tune. ``shape`` is gate's shape (``[tokens, intermediate]``); for the one-tensor
    layouts the input is twice as wide."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.act = flags.get("act", "silu")
        if self.act not in ACTS:
            raise ValueError(f"swiglu problem: flag act must be one of {ACTS}, got {self.act!r}")
        self.layout = flags.get("layout", "separate")
        if self.layout not in LAYOUTS:
            raise ValueError(f"swiglu problem: flag layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"swiglu problem: shape must be positive sizes, got {shape}")
        self.hidden = int(shape[-1])
        self.rows = 1
        for s in shape[:-1]:
            self.rows *= int(s)
        self.flags = {"act": self.act, "layout": self.layout}
        self.key = pattern_key(self.act, self.layout, self.dtype)
        self._cases: dict[tuple, Case] = {}
        self._refs: dict[int, dict[str, torch.Tensor]] = {}
        self._source_dir: str | None = None

    def describe(self) -> str:
        return f"swiglu {self.rows}x{self.hidden} {dtype_name(self.dtype)} act={self.act} layout={self.layout}"

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, config) pairs: the forward's knobs first (backward at default), then the backward's.

        The tuner fills in the backward phase's forward knobs with the forward phase's winner. Kept to 4 to 32
        elements per thread: fewer leaves loads unissued, more spills the backward's five streams."""
        base = self.default_candidate()
        out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
        for block in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                per_thread = block // (32 * warps)
                if 4 <= per_thread <= 32:
                    cand = {**base, "fwd_block": block, "fwd_num_warps": warps}
                    if cand != base:
                        out.append(("fwd", cand))
        for block in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                if 4 <= block // (32 * warps) <= 16:
                    out.append(("bwd", {**base, "bwd_block": block, "bwd_num_warps": warps}))
        return out

    # ---- inputs and references ---------------------------------------------------------------
    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        """``scale`` multiplies the gate (the activation's argument); up and dy stay at unit scale."""
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            g = torch.Generator(device="cpu").manual_seed(2000 + seed)
            if self.dtype == torch.float16:
                scale = min(scale, _FP16_MAX_SCALE)
            pad = 7 if noncontiguous else 0
            gate = torch.randn(rows, hidden + pad, generator=g) * scale
            up = torch.randn(rows, hidden + pad, generator=g)
            if zero_row and rows:
                gate[0] = 0
                up[0] = 0
            dy = torch.randn(rows, hidden + pad, generator=g).to(self.dtype).to(self.device)[:, :hidden]
            if self.layout == "separate":
                x = gate.to(self.dtype).to(self.device)[:, :hidden]
                u = up.to(self.dtype).to(self.device)[:, :hidden]
            else:
                first, second = (gate, up) if self.layout == "gate_up" else (up, gate)
                x = torch.cat([first[:, :hidden], second[:, :hidden], first[:, hidden:]], dim=1)
                x = x.to(self.dtype).to(self.device)[:, :2 * hidden]
                u = None
            if not noncontiguous:
                x, dy = x.contiguous(), dy.contiguous()
                u = u.contiguous() if u is not None else None
            self._cases[key] = Case(x, u, dy)
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            x = case.x.detach().clone().requires_grad_(True)
            up = case.up.detach().clone().requires_grad_(True) if case.up is not None else None
            y = swiglu_reference(x, up, self.act, self.layout)
            y.backward(case.dy.double())
            if up is None:
                self._refs[key] = {"y": y.detach(), "dx": x.grad}
            else:
                self._refs[key] = {"y": y.detach(), "dgate": x.grad, "dup": up.grad}
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[SwigluConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (complete kernel source) for agent-written kernels."""
        cfg = SwigluConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        cfg, k = self._kernels(config)
        y = swiglu_fwd(case.x, case.up, self.act, self.layout, cfg, k)
        dx, dup = swiglu_bwd(case.dy, case.x, case.up, self.act, self.layout, cfg, k)
        return {"y": y, "dx": dx} if dup is None else {"y": y, "dgate": dx, "dup": dup}

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """Every output passes through the one dtype of the inputs."""
        del output
        return self.dtype

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, k = self._kernels(config)

        def fwd():
            return swiglu_fwd(case.x, case.up, self.act, self.layout, cfg, k)

        def train():
            swiglu_fwd(case.x, case.up, self.act, self.layout, cfg, k)
            return swiglu_bwd(case.dy, case.x, case.up, self.act, self.layout, cfg, k)

        return {"fwd": fwd, "train": train}

    def eager(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """This variant as a model writes it; what Inductor compiles in the race."""
        if up is None:
            first, second = x.chunk(2, dim=-1)
            gate, up = (first, second) if self.layout == "gate_up" else (second, first)
        else:
            gate = x
        if self.act == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh" if self.act == "gelu_tanh" else "none") * up

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        leaves = [t.detach().clone().requires_grad_(True) for t in (case.x, case.up) if t is not None]

        def fwd():
            with torch.no_grad():
                return compiled(case.x, case.up)

        def train():
            compiled(*leaves).backward(case.dy)
            for t in leaves:
                t.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads gate and up, writes y; bwd reads gate, up and dy,
        writes dgate and dup."""
        n = self.rows * self.hidden * self.dtype.itemsize
        return {"fwd": 3 * n, "train": 3 * n + 5 * n}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.swiglu import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"act={self.act} (ACT={kernels.ACTS.index(self.act)}), layout={self.layout}, "
                       f"{dtype_name(self.dtype)}",
            "contract": (f"Define {FWD_KERNEL} and {BWD_KERNEL}. " + (kernels.SourceKernels.__doc__ or "")).strip(),
            "config_keys": SwigluConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }
