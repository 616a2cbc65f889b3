"""Cross-entropy as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing
of cross-entropy's math; this module knows nothing of the tuner's search or of FX.

The kernel space: the forward is one read of the logits, writing each row's loss (and, for training,
8 bytes of statistics). What moves its time is the chunk width and the warps per row (loads in flight
per SM, registers per thread). The backward recomputes the gradient elementwise from the logits and the
statistics: one read, one write; block width and warps. (The ``train_*`` knobs of the config belong to
the gradient-writing forward that only linear + cross-entropy launches: not searched here.)

Flags: ``reduction`` (mean, sum, none; default mean), ``ignore_index`` (default -100),
``label_smoothing`` (default 0), ``upcast`` (the model computes in float32 from lower-precision
logits, ``logits.float()``; default true). Every fifth row of the cases is ignored.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.lowering.cross_entropy.kernels import (
    REDUCTIONS,
    CrossEntropyConfig,
    SourceKernels,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_reference,
    default_config,
)
from autokernel.lowering.cross_entropy.ops import BWD_KERNEL, FWD_KERNEL, PATTERN, pattern_key, source_kernels
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.row_problem import RowProblem, flag_bool, problem_dtype

IGNORE_EVERY = 5  # rows 2, 7, 12, ... of every case carry ignore_index


@dataclass
class Case:
    logits: torch.Tensor
    labels: torch.Tensor
    dloss: torch.Tensor


class CrossEntropyProblem(RowProblem):
    """One (variant, shape) to tune. ``shape`` is ``[rows, classes]`` (rows: all but the last dim)."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.reduction = str(flags.get("reduction", "mean"))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"cross_entropy problem: flag reduction must be one of {REDUCTIONS}, "
                             f"got {self.reduction!r}")
        try:
            self.ignore_index = int(flags.get("ignore_index", -100))
            self.label_smoothing = float(flags.get("label_smoothing", 0.0))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cross_entropy problem: flags ignore_index (an int) and label_smoothing "
                             f"(a float): {exc}") from None
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"cross_entropy problem: label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        self.upcast = flag_bool(PATTERN, flags, "upcast", True) and self.dtype != torch.float32
        self.out_dtype = torch.float32 if self.upcast else self.dtype
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"cross_entropy problem: shape must be positive sizes, got {shape}")
        self.hidden = int(shape[-1])
        self.rows = 1
        for s in shape[:-1]:
            self.rows *= int(s)
        self.flags = {"reduction": self.reduction, "ignore_index": self.ignore_index,
                      "label_smoothing": self.label_smoothing, "upcast": self.upcast}
        self.key = pattern_key(self.reduction, self.ignore_index, self.label_smoothing, self.dtype, self.out_dtype)
        self._cases: dict[tuple, Case] = {}
        self._source_dir: str | None = None
        self._refs: dict[int, dict[str, torch.Tensor]] = {}

    def describe(self) -> str:
        return (f"cross_entropy {self.rows}x{self.hidden} {dtype_name(self.dtype)} reduction={self.reduction} "
                f"ignore_index={self.ignore_index} label_smoothing={self.label_smoothing:g} upcast={self.upcast}")

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, config) pairs: the forward's knobs first, then the backward's, the tuner carrying the
        forward's winner."""
        base = self.default_candidate()
        out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
        blocks = [b for b in (1024, 2048, 4096, 8192, 16384, 32768) if b <= max(1024, self._block())]
        for block in blocks:
            for warps in (4, 8, 16, 32):
                cand = {**base, "fwd_block_n": block, "fwd_num_warps": warps}
                if cand != base and self._plausible(block, warps):
                    out.append(("fwd", cand))
        out.append(("bwd", base))
        for block in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                if block <= max(1024, self._block()) and self._plausible(block, warps):
                    out.append(("bwd", {**base, "bwd_block_n": block, "bwd_num_warps": warps}))
        return out

    def _block(self) -> int:
        return 1 << max(self.hidden - 1, 0).bit_length()

    @staticmethod
    def _plausible(block: int, warps: int) -> bool:
        # Fewer than ~2 or more than ~64 elements per thread wastes lanes or spills registers.
        return 2 <= block / (warps * 32) <= 64

    # ---- inputs and references ---------------------------------------------------------------
    def sweep_shapes(self, max_rows: int | None = None) -> list[tuple[int, int]]:
        """1 row, a few awkward row counts, and the target (large) rows; the width one less (odd, for an
        even vocabulary) on the small row counts only: at 8192 x 128256 each full-size case and its
        reference hold gigabytes."""
        rows, hidden = self.target_shape(max_rows)
        counts = sorted({1, 3, min(rows, 130), rows})
        narrower = [(r, hidden - 1) for r in counts if r <= 130] if hidden > 2 else []
        return [(r, hidden) for r in counts] + narrower

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
            if not noncontiguous:
                x = x.contiguous()
            labels = torch.randint(0, hidden, (rows,), generator=g)
            labels[2::IGNORE_EVERY] = self.ignore_index
            shape = (rows,) if self.reduction == "none" else ()
            dloss = torch.randn(shape, generator=g).to(self.out_dtype)
            self._cases[key] = Case(x, labels.to(self.device), dloss.to(self.device))
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            x = case.logits.detach().clone().requires_grad_(True)
            loss = cross_entropy_reference(x, case.labels, self.ignore_index, self.label_smoothing, self.reduction)
            loss.backward(case.dloss.double())
            # The gradient kept in float32 (its rounding is far below any tolerance row): a float64 copy of
            # 8192 x 128256 logits is 8 GB per case.
            self._refs[key] = {"loss": loss.detach(), "loss_fwd": loss.detach(), "dlogits": x.grad.float()}
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[CrossEntropyConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (complete kernel source) for agent-written kernels."""
        cfg = CrossEntropyConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def _fwd(self, cfg, k, case: Case, with_stats: bool):
        return cross_entropy_fwd(case.logits, case.labels, self.ignore_index, self.label_smoothing, self.reduction,
                                 self.out_dtype, cfg, with_stats, k)

    def _train(self, cfg, k, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pair as the op and its backward run it: the loss and the logits' gradient."""
        loss, stats = self._fwd(cfg, k, case, True)
        return loss, cross_entropy_bwd(case.dloss, case.logits, case.labels, stats, self.ignore_index,
                                       self.label_smoothing, self.reduction, cfg, k)

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        """The forward alone (``loss_fwd``) and the training pair (``loss``, ``dlogits``)."""
        cfg, k = self._kernels(config)
        loss_fwd, _ = self._fwd(cfg, k, case, False)
        loss, dlogits = self._train(cfg, k, case)
        return {"loss": loss, "loss_fwd": loss_fwd, "dlogits": dlogits}

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The tolerance row for an output: the coarsest dtype that output passed through."""
        return self.dtype if output == "dlogits" else self.out_dtype

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, k = self._kernels(config)

        def fwd():
            return self._fwd(cfg, k, case, False)

        def train():
            return self._train(cfg, k, case)

        return {"fwd": fwd, "train": train}

    def eager(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This variant as a model writes it; what Inductor compiles in the race."""
        x = logits.float() if self.upcast else logits
        return torch.nn.functional.cross_entropy(x, labels, ignore_index=self.ignore_index,
                                                 reduction=self.reduction, label_smoothing=self.label_smoothing)

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        x = case.logits.detach().clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return compiled(case.logits, case.labels)

        def train():
            loss = compiled(x, case.labels)
            loss.backward(case.dloss)
            x.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads the logits and labels; training also writes the
        logits' gradient (one pass could, writing it from the forward's read; ours reads the logits again
        in the backward)."""
        n = self.rows * self.hidden
        xb = self.dtype.itemsize
        labels = self.rows * 8
        fwd = n * xb + labels
        return {"fwd": fwd, "train": fwd + n * xb}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.cross_entropy import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                       f"label_smoothing={self.label_smoothing:g}, logits {dtype_name(self.dtype)}, "
                       f"loss {dtype_name(self.out_dtype)}",
            "contract": (f"Define {FWD_KERNEL} and {BWD_KERNEL}. " + (kernels.SourceKernels.__doc__ or "")).strip(),
            "config_keys": CrossEntropyConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }
