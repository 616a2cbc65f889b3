"""LayerNorm as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing of
LayerNorm's math; this module knows nothing of the tuner's search or of FX. A normalized shape over
several trailing dims was flattened into one row width by the matcher, so a problem is always
``rows x hidden``.

The kernel space: the forward is one read of ``x`` and one write of ``y`` (plus the per-row mean and
rstd); warps per row (loads in flight per SM) and rows per program (amortizing the weight and bias loads
on narrow rows) move its time. The backward reads ``x`` and ``dy`` and writes ``dx``; its knobs are warps
per row and programs per SM of the persistent grid (more programs hide latency; fewer shrink the
``[P, H]`` partial dW and dB buffers and their reduction). Rows of 16K and wider get chunked candidates,
which keep a chunk rather than the row in registers. The reduction of the partials has its own tile (columns
a program, partial rows a step, warps): a few tiles are tried on the default backward, first in its phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autokernel.lowering.layer_norm.kernels import (
    MODES,
    LayerNormConfig,
    default_config,
    layer_norm_bwd,
    layer_norm_fwd,
    layer_norm_reference,
)
from autokernel.lowering.layer_norm.ops import PATTERN, pattern_key
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.row_problem import RowProblem, norm_candidates, problem_dtype

EPS = 1e-5
# (columns a program, partial rows a step, warps) of the partial-gradient reduction worth a try.
SUM_TILES = ((32, 64, 4), (16, 128, 4), (32, 128, 8), (64, 64, 4))


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    dy: torch.Tensor


class LayerNormProblem(RowProblem):
    """One (variant, shape) to tune. ``shape`` is the example input shape; rows are all but the last dim."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.mode = flags.get("mode", "fp32")
        if self.mode not in MODES:
            raise ValueError(f"layer_norm problem: flag mode must be one of {MODES}, got {self.mode!r}")
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        wname, bname = flags.get("weight", dtype), flags.get("bias", dtype)
        self.w_dtype = None if wname == "none" else problem_dtype(PATTERN, wname, "flag weight")
        self.b_dtype = None if bname == "none" else problem_dtype(PATTERN, bname, "flag bias")
        self.out_dtype = problem_dtype(PATTERN, flags.get("out", dtype), "flag out")
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"layer_norm problem: shape must be positive sizes, got {shape}")
        self.hidden = int(shape[-1])
        self.rows = 1
        for s in shape[:-1]:
            self.rows *= int(s)
        self.flags = {"mode": self.mode, "weight": dtype_name(self.w_dtype) if self.w_dtype else "none",
                      "bias": dtype_name(self.b_dtype) if self.b_dtype else "none", "out": dtype_name(self.out_dtype)}
        self.key = pattern_key(self.mode, self.dtype, self.w_dtype, self.b_dtype, self.out_dtype)
        self.max_rows: int | None = None  # the worker sets it
        self._cases: dict[tuple, Case] = {}
        self._refs: dict[int, dict[str, torch.Tensor]] = {}

    def describe(self) -> str:
        return (f"layer_norm {self.rows}x{self.hidden} {dtype_name(self.dtype)} mode={self.mode} "
                f"weight={self.flags['weight']} bias={self.flags['bias']}")

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        default = default_config(self.hidden, self.rows, self.dtype)
        base = default.to_dict()
        out = norm_candidates(base, self.hidden)
        # The reduction's other tiles, on the default backward: ahead of the rest of the backward phase, since a
        # short budget reaches only its first few candidates.
        first_bwd = next(i for i, (phase, _) in enumerate(out) if phase == "bwd")
        tiles = [("bwd", {**base, "sum_block_n": n, "sum_block_p": p, "sum_num_warps": w})
                 for n, p, w in SUM_TILES if (n, p, w) != default.sum_tile]
        return out[:first_bwd] + tiles + out[first_bwd:]

    # ---- inputs and references ---------------------------------------------------------------
    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            g = torch.Generator(device="cpu").manual_seed(2000 + seed)
            pad = 7 if noncontiguous else 0
            # An offset per row, so that the mean is not ~0 and its subtraction matters.
            x = (torch.randn(rows, hidden + pad, generator=g) + 3 * torch.randn(rows, 1, generator=g)) * scale
            if zero_row and rows:
                x[0] = 0
            x = x.to(self.dtype).to(self.device)[:, :hidden]
            w = b = None
            if self.w_dtype is not None:
                w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(self.w_dtype).to(self.device)
            if self.b_dtype is not None:
                b = (0.1 * torch.randn(hidden, generator=g)).to(self.b_dtype).to(self.device)
            dy = torch.randn(rows, hidden + pad, generator=g).to(self.out_dtype).to(self.device)[:, :hidden]
            if not noncontiguous:
                x, dy = x.contiguous(), dy.contiguous()
            self._cases[key] = Case(x, w, b, dy)
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            x = case.x.detach().clone().requires_grad_(True)
            w = case.weight.detach().clone().requires_grad_(True) if case.weight is not None else None
            b = case.bias.detach().clone().requires_grad_(True) if case.bias is not None else None
            y = layer_norm_reference(x, w, b, EPS, 1, self.mode)
            y.backward(case.dy.double())
            ref = {"y": y.detach(), "dx": x.grad}
            if w is not None:
                ref["dw"] = w.grad
            if b is not None:
                ref["db"] = b.grad
            self._refs[key] = ref
        return self._refs[key]

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        cfg = LayerNormConfig.from_dict(config)
        y, mean, rstd = layer_norm_fwd(case.x, case.weight, case.bias, EPS, 1, self.mode, self.out_dtype, cfg, True)
        dx, dw, db = layer_norm_bwd(case.dy, case.x, case.weight, case.bias, mean, rstd, 1, self.mode, cfg)
        out = {"y": y, "dx": dx}
        if dw is not None:
            out["dw"] = dw
        if db is not None:
            out["db"] = db
        return out

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The tolerance row for an output: the coarsest dtype that output passed through."""
        order = [torch.float32, torch.float16, torch.bfloat16]
        extra = {"dw": [self.w_dtype], "db": [self.b_dtype]}.get(output, [])
        dts = [self.dtype, self.out_dtype] + [d for d in extra if d is not None]
        return max(dts, key=order.index)

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg = LayerNormConfig.from_dict(config)

        def fwd():
            return layer_norm_fwd(case.x, case.weight, case.bias, EPS, 1, self.mode, self.out_dtype, cfg, False)

        def train():
            _, mean, rstd = layer_norm_fwd(case.x, case.weight, case.bias, EPS, 1, self.mode, self.out_dtype, cfg,
                                           True)
            return layer_norm_bwd(case.dy, case.x, case.weight, case.bias, mean, rstd, 1, self.mode, cfg)

        return {"fwd": fwd, "train": train}

    def eager(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """This variant as a model writes it; what Inductor compiles in the race."""
        shape = (x.shape[-1],)
        if self.mode == "rounded":
            n = F.layer_norm(x.float(), shape, None, None, EPS).to(x.dtype)
            y = n * weight if weight is not None else n
            return (y + bias if bias is not None else y).to(self.out_dtype)
        if all(t is None or t.dtype == x.dtype for t in (weight, bias)) and self.out_dtype == x.dtype:
            return F.layer_norm(x, shape, weight, bias, EPS)
        return F.layer_norm(x.float(), shape, weight.float() if weight is not None else None,
                            bias.float() if bias is not None else None, EPS).to(self.out_dtype)

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        x = case.x.detach().clone().requires_grad_(True)
        params = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (case.weight, case.bias)]

        def fwd():
            with torch.no_grad():
                return compiled(case.x, case.weight, case.bias)

        def train():
            compiled(x, *params).backward(case.dy)
            for t in (x, *params):
                if t is not None:
                    t.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads x (w, b), writes y; bwd reads x, dy (w), writes dx
        (dw, db). The per-row mean and rstd (8 bytes a row) are left out, as they are for every peer."""
        n = self.rows * self.hidden
        xb, ob = self.dtype.itemsize, self.out_dtype.itemsize
        wb = self.hidden * self.w_dtype.itemsize if self.w_dtype else 0
        bb = self.hidden * self.b_dtype.itemsize if self.b_dtype else 0
        fwd = n * (xb + ob) + wb + bb
        bwd = n * (xb + ob + xb) + 2 * wb + bb
        return {"fwd": fwd, "train": fwd + bwd}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.layer_norm import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"mode={self.mode} (rounded: round xhat to x's dtype before the affine), "
                       f"x {dtype_name(self.dtype)}, weight {self.flags['weight']}, bias {self.flags['bias']}, "
                       f"out {self.flags['out']}",
            "contract": "This family serves configurations of its built-in kernels only (no source entries): "
                        "submit a config; a submission with source is rejected.",
            "config_keys": LayerNormConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }
