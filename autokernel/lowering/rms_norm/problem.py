"""RMSNorm as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing
of RMSNorm's math; this module knows nothing of the tuner's search or of FX.

The kernel space (the playbook's RMSNorm chapter): the forward is one read of ``x`` and one write
of ``y``; what moves its time is warps per row (enough loads in flight per SM) and rows per program
(amortizing the weight load and launch overhead on narrow rows). The backward reads ``x`` and ``dy``
and writes ``dx``; its knobs are warps per row and programs per SM of the persistent grid (more
programs hide latency; fewer shrink the ``[P, H]`` partial-dW buffer and its final reduction). Rows of
16K elements and wider add each pass's chunk width (``fwd_block_n``, ``block_n``) and the split backward
(``bwd_split_n``), whose partial dW stays in registers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.rms_norm.kernels import (
    RmsNormConfig,
    SourceKernels,
    add_rms_norm_fwd,
    default_config,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)
from autokernel.lowering.rms_norm.ops import BWD_KERNEL, FWD_KERNEL, PATTERN, pattern_key, source_kernels
from autokernel.lowering.row_problem import RowProblem, norm_candidates, problem_dtype

EPS = 1e-6


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor | None
    dy: torch.Tensor
    residual: torch.Tensor | None = None  # add + RMSNorm: the second addend
    dh: torch.Tensor | None = None  # add + RMSNorm: the gradient h gets from its other readers


class RmsNormProblem(RowProblem):
    """One (variant, shape) to tune. ``shape`` is the example input shape; rows are all but the last dim."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.mode = flags.get("mode", "llama")
        if self.mode not in ("llama", "gemma"):
            raise ValueError(f"rms_norm problem: flag mode must be 'llama' or 'gemma', got {self.mode!r}")
        self.offset = float(flags.get("offset", 0.0))
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        wname = flags.get("weight", dtype)
        self.w_dtype = None if wname == "none" else problem_dtype(PATTERN, wname, "flag weight")
        self.out_dtype = problem_dtype(PATTERN, flags.get("out", dtype), "flag out")
        self.residual = bool(flags.get("residual", False))
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"rms_norm problem: shape must be positive sizes, got {shape}")
        self.hidden = int(shape[-1])
        self.rows = 1
        for s in shape[:-1]:
            self.rows *= int(s)
        self.flags = {"mode": self.mode, "offset": self.offset,
                      "weight": dtype_name(self.w_dtype) if self.w_dtype else "none",
                      "out": dtype_name(self.out_dtype)}
        if self.residual:
            self.flags["residual"] = True
        self.key = pattern_key(self.mode, self.offset, self.dtype, self.w_dtype, self.out_dtype, self.residual)
        self._cases: dict[tuple, Case] = {}
        self._source_dir: str | None = None
        self._refs: dict[tuple, dict[str, torch.Tensor]] = {}

    def describe(self) -> str:
        what = "add_rms_norm" if self.residual else "rms_norm"
        return f"{what} {self.rows}x{self.hidden} {dtype_name(self.dtype)} mode={self.mode} offset={self.offset:g}"

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        return norm_candidates(self.default_candidate(), self.hidden)

    # ---- inputs and references ---------------------------------------------------------------
    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            g = torch.Generator(device="cpu").manual_seed(1000 + seed)
            pad = 7 if noncontiguous else 0
            x = torch.randn(rows, hidden + pad, generator=g) * scale
            if zero_row and rows:
                x[0] = 0
            x = x.to(self.dtype).to(self.device)[:, :hidden]
            w = None
            if self.w_dtype is not None:
                w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(self.w_dtype).to(self.device)
            dy = torch.randn(rows, hidden + pad, generator=g).to(self.out_dtype).to(self.device)[:, :hidden]
            if not noncontiguous:
                x, dy = x.contiguous(), dy.contiguous()
            residual = dh = None
            if self.residual:
                residual = (torch.randn(rows, hidden, generator=g) * scale).to(self.dtype).to(self.device)
                dh = torch.randn(rows, hidden, generator=g).to(self.dtype).to(self.device)
            self._cases[key] = Case(x, w, dy, residual, dh)
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            x = case.x.detach().clone().requires_grad_(True)
            w = case.weight.detach().clone().requires_grad_(True) if case.weight is not None else None
            if case.residual is None:
                y = rms_norm_reference(x, w, EPS, self.offset, self.mode, self.out_dtype)
                y.backward(case.dy.double())
                ref = {"y": y.detach(), "dx": x.grad}
            else:
                res = case.residual.detach().clone().requires_grad_(True)
                exact = x.double() + res.double()
                # Eager adds in x's dtype: round the sum, with the exact sum's gradient (straight through).
                h = exact + (exact.to(self.dtype).double() - exact).detach()
                y = rms_norm_reference(h, w, EPS, self.offset, self.mode, self.out_dtype)
                torch.autograd.backward([y, h], [case.dy.double(), case.dh.double()])
                ref = {"y": y.detach(), "h": h.detach(), "dx": x.grad, "dresidual": res.grad}
            if w is not None:
                ref["dw"] = w.grad
            self._refs[key] = ref
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[RmsNormConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (complete kernel source) for agent-written kernels."""
        cfg = RmsNormConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def _forward(self, cfg: RmsNormConfig, k: SourceKernels | None, case: Case, save_rstd: bool):
        """(y, rstd, the norm's input: x, or h for add + RMSNorm)."""
        if case.residual is None:
            y, rstd = rms_norm_fwd(case.x, case.weight, EPS, self.offset, self.mode, self.out_dtype, cfg, save_rstd, k)
            return y, rstd, case.x
        y, h, rstd = add_rms_norm_fwd(case.x, case.residual, case.weight, EPS, self.offset, self.mode,
                                      self.out_dtype, cfg, save_rstd, k)
        return y, rstd, h

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        cfg, k = self._kernels(config)
        y, rstd, h = self._forward(cfg, k, case, True)
        dx, dw = rms_norm_bwd(case.dy, h, case.weight, rstd, self.offset, self.mode, cfg, k, dh=case.dh)
        out = {"y": y, "dx": dx}
        if case.residual is not None:
            out.update(h=h, dresidual=dx)
        if dw is not None:
            out["dw"] = dw
        return out

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The tolerance row for an output: the coarsest dtype that output passed through."""
        order = [torch.float32, torch.float16, torch.bfloat16]
        dts = [self.dtype, self.out_dtype] + ([self.w_dtype] if output == "dw" and self.w_dtype else [])
        return max(dts, key=order.index)

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, k = self._kernels(config)

        def fwd():
            return self._forward(cfg, k, case, False)

        def train():
            _, rstd, h = self._forward(cfg, k, case, True)
            return rms_norm_bwd(case.dy, h, case.weight, rstd, self.offset, self.mode, cfg, k, dh=case.dh)

        return {"fwd": fwd, "train": train}

    def eager(self, x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None = None):
        """This variant as a model writes it; what Inductor compiles in the race. Add + RMSNorm returns
        ``(y, h)``."""
        if residual is not None:
            s = x + residual
            return self.eager(s, weight), s
        h = x.to(torch.float32)
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        if weight is None:
            return n.to(self.out_dtype)
        w = weight.float() + self.offset if self.offset else weight
        if self.mode == "llama":
            return (w * n.to(x.dtype)).to(self.out_dtype)
        return (n * w.float()).to(self.out_dtype)

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        x = case.x.detach().clone().requires_grad_(True)
        w = case.weight.detach().clone().requires_grad_(True) if case.weight is not None else None
        res = case.residual.detach().clone().requires_grad_(True) if case.residual is not None else None

        def fwd():
            with torch.no_grad():
                return compiled(case.x, case.weight, case.residual)

        def train():
            if res is None:
                compiled(x, w).backward(case.dy)
            else:
                torch.autograd.backward(compiled(x, w, res), [case.dy, case.dh])
                res.grad = None
            x.grad = None
            if w is not None:
                w.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads x, writes y; bwd reads x and dy, writes dx. Add +
        RMSNorm: fwd also reads the residual and writes h; bwd also reads dh."""
        n = self.rows * self.hidden
        xb, ob = self.dtype.itemsize, self.out_dtype.itemsize
        wb = self.hidden * self.w_dtype.itemsize if self.w_dtype else 0
        extra = 2 * xb if self.residual else 0
        fwd = n * (xb + ob + extra) + wb
        bwd = n * (xb + ob + xb + extra // 2) + 2 * wb
        return {"fwd": fwd, "train": fwd + bwd}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.rms_norm import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"mode={self.mode} (llama: round n to x's dtype before the weight), offset={self.offset}, "
                       f"x {dtype_name(self.dtype)}, weight {self.flags['weight']}, out {self.flags['out']}"
                       + (", add + RMSNorm: normalizes h = x + residual and stores h (HAS_RESIDUAL); the "
                          "backward adds dh (HAS_DH)" if self.residual else ""),
            "contract": (f"Define {FWD_KERNEL} and {BWD_KERNEL}. " + (kernels.SourceKernels.__doc__ or "")).strip(),
            "config_keys": RmsNormConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }

