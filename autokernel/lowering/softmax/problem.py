"""Softmax (and log-softmax) as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing
of softmax's math; this module knows nothing of the tuner's search or of FX.

The kernel space: the forward is one read of ``x`` and one write of ``y``, the backward one read each of
``y`` and ``dy`` and one write of ``dx``. What moves their time is warps per row (enough loads in flight per
SM, few enough lanes per thread that the row stays in registers) and rows per program (amortizing program
start-up on narrow rows); on very wide rows, whether to stream the row in chunks (a second read) rather
than hold it whole (register spills), and the chunk width.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.row_problem import RowProblem, next_pow2, plausible_warps, problem_dtype
from autokernel.lowering.softmax.kernels import (
    SoftmaxConfig,
    SourceKernels,
    default_config,
    softmax_bwd,
    softmax_fwd,
    softmax_reference,
)
from autokernel.lowering.softmax.ops import BWD_KERNEL, FWD_KERNEL, OPS, PATTERN, pattern_key, source_kernels


@dataclass
class Case:
    x: torch.Tensor
    dy: torch.Tensor


class SoftmaxProblem(RowProblem):
    """One (variant, shape) to tune. ``shape`` is the example input shape; rows are all but the last dim.

    Flags: ``op`` (``softmax`` or ``log_softmax``, default softmax) and ``out`` (the output dtype's name,
    default the input's)."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        op = flags.get("op", "softmax")
        if op not in OPS:
            raise ValueError(f"softmax problem: flag op must be one of {OPS}, got {op!r}")
        self.log = op == "log_softmax"
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        self.out_dtype = problem_dtype(PATTERN, flags.get("out", dtype), "flag out")
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"softmax problem: shape must be positive sizes, got {shape}")
        self.hidden = int(shape[-1])
        self.rows = 1
        for s in shape[:-1]:
            self.rows *= int(s)
        self.flags = {"op": op, "out": dtype_name(self.out_dtype)}
        self.key = pattern_key(self.log, self.dtype, self.out_dtype)
        self._cases: dict[tuple, Case] = {}
        self._source_dir: str | None = None
        self._refs: dict[int, dict[str, torch.Tensor]] = {}

    def describe(self) -> str:
        out = "" if self.out_dtype == self.dtype else f" out={dtype_name(self.out_dtype)}"
        return f"{OPS[self.log]} {self.rows}x{self.hidden} {dtype_name(self.dtype)}{out}"

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, config) pairs: the forward knobs first (backward at default), then the backward's.

        The tuner fills in the backward phase's forward knobs with the forward phase's winner."""
        base = self.default_candidate()
        wide = self.hidden >= 16384
        # Rows this wide may spill a single-pass program's registers; chunks read the row twice but keep
        # each chunk in registers. Both are tried.
        blocks = (0, 2048, 4096, 8192) if wide else (0,)
        out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
        for phase in ("fwd", "bwd"):
            for block_n in blocks:
                for warps in (1, 2, 4, 8, 16, 32):
                    for rpp in (1, 2, 4):
                        cand = {**base, f"{phase}_num_warps": warps, f"{phase}_rows_per_program": rpp,
                                f"{phase}_block_n": block_n}
                        new = phase == "bwd" or cand != base  # the bwd phase measures its baseline too
                        if new and self._plausible(warps, block_n) and (block_n == 0 or rpp == 1):
                            out.append((phase, cand))
        return out

    def _plausible(self, warps: int, block_n: int) -> bool:
        return plausible_warps(block_n or next_pow2(self.hidden), warps)

    # ---- inputs and references ---------------------------------------------------------------
    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            g = torch.Generator(device="cpu").manual_seed(2000 + seed)
            pad = 7 if noncontiguous else 0
            x = torch.randn(rows, hidden + pad, generator=g) * scale
            if zero_row and rows:
                x[0] = 0
            x = x.to(self.dtype).to(self.device)[:, :hidden]
            dy = torch.randn(rows, hidden + pad, generator=g).to(self.out_dtype).to(self.device)[:, :hidden]
            if not noncontiguous:
                x, dy = x.contiguous(), dy.contiguous()
            self._cases[key] = Case(x, dy)
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            x = case.x.detach().clone().requires_grad_(True)
            y = softmax_reference(x, self.log, self.out_dtype)
            y.backward(case.dy.double())
            self._refs[key] = {"y": y.detach(), "dx": x.grad}
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[SoftmaxConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (complete kernel source) for agent-written kernels."""
        cfg = SoftmaxConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        cfg, k = self._kernels(config)
        y = softmax_fwd(case.x, self.log, self.out_dtype, cfg, k)
        dx = softmax_bwd(case.dy, y, self.log, self.dtype, cfg, k)
        return {"y": y, "dx": dx}

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The tolerance row for an output: the coarsest dtype it passed through (the backward reads the
        rounded ``y``, so both outputs see the input's and the output's dtype)."""
        del output
        order = [torch.float32, torch.float16, torch.bfloat16]
        return max((self.dtype, self.out_dtype), key=order.index)

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, k = self._kernels(config)

        def fwd():
            return softmax_fwd(case.x, self.log, self.out_dtype, cfg, k)

        def train():
            y = softmax_fwd(case.x, self.log, self.out_dtype, cfg, k)
            return softmax_bwd(case.dy, y, self.log, self.dtype, cfg, k)

        return {"fwd": fwd, "train": train}

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """This variant as a model writes it; what Inductor compiles in the race. A different output dtype
        is HF's attention spelling: ``F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)``."""
        fn = F.log_softmax if self.log else F.softmax
        if self.out_dtype == self.dtype:
            return fn(x, dim=-1)
        return fn(x, dim=-1, dtype=torch.float32).to(self.out_dtype)

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        x = case.x.detach().clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return compiled(case.x)

        def train():
            y = compiled(x)
            y.backward(case.dy)
            x.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads x, writes y; bwd reads y and dy, writes dx."""
        n = self.rows * self.hidden
        xb, ob = self.dtype.itemsize, self.out_dtype.itemsize
        fwd = n * (xb + ob)
        bwd = n * (ob + ob + xb)
        return {"fwd": fwd, "train": fwd + bwd}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.softmax import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"op={OPS[self.log]}, x {dtype_name(self.dtype)}, out {self.flags['out']}",
            "contract": (f"Define {FWD_KERNEL} and {BWD_KERNEL}. " + (kernels.SourceKernels.__doc__ or "")).strip(),
            "config_keys": SoftmaxConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }
