"""Linear + cross-entropy as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

Shape: ``[tokens, hidden, vocab]`` (``ak-tune --pattern linear_cross_entropy --shape 8192x4096x128256``), or
``[tokens, hidden]`` with the vocabulary in the flags (``--flags vocab=128256``; what the wanted table and a
cache entry's check hold: the cache looks entries up by hidden size, the vocabulary is part of the variant).

Flags: ``vocab``; ``reduction`` (mean, sum, none; default mean), ``ignore_index`` (default -100),
``label_smoothing`` (default 0), ``upcast`` (the loss in float32 from lower-precision logits,
``logits.float()``; default true), ``bias`` (the lm_head has one; default false), ``logits_out`` (the model
also returns the logits; default false). Every fifth row of the cases is ignored.

The kernel space: rows per chunk (memory against the matmuls' efficiency and the re-reads of ``dW``; capped
so that the chunk buffer stays under ``kernels.max_chunk_bytes``: the tuner measures time, not memory), and
the cross-entropy kernel's chunk width and warps, for the forward alone (``fwd_*``) and for the pass that
computes the gradients (``train_*``).

Floor: the pass is compute-bound (``2 N H V`` flops per matmul: one in the forward, three with the
gradients; ~32.7 ms of matmul at 8192 x 4096 -> 128256 on an H100), so no kernel comes near the DRAM floor
the tuner reports. For consistency with the other families it is still given in bytes: the forward reads
``h``, ``W`` (and the bias and labels); training also writes ``dh`` and ``dW`` (and ``db``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.lowering.cross_entropy.kernels import REDUCTIONS, SourceKernels
from autokernel.lowering.cross_entropy.ops import BWD_KERNEL, FWD_KERNEL, source_kernels
from autokernel.lowering.cross_entropy.problem import CrossEntropyProblem
from autokernel.lowering.linear_cross_entropy.kernels import (
    ROW_MULTIPLE,
    Grads,
    LinearCrossEntropyConfig,
    Result,
    default_config,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    max_chunk_bytes,
)
from autokernel.lowering.linear_cross_entropy.ops import PATTERN, pattern_key
from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.row_problem import RowProblem, flag_bool, problem_dtype

IGNORE_EVERY = 5  # rows 2, 7, 12, ... of every case carry ignore_index


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    dloss: torch.Tensor


class LinearCrossEntropyProblem(RowProblem):
    """One (variant, shape) to tune (see the module docstring for the shape and the flags): ``rows`` rows of
    ``hidden`` elements, as the row-wise families' problems, with the vocabulary beside them."""

    pattern = PATTERN
    # The pattern exists to save memory (no [tokens, vocab] logits nor their gradient): the tuner serves it up to
    # 5% slower than Inductor where it takes at most half Inductor's peak memory in context (issue 3's bar:
    # 1.05x Inductor's time within 1.4 GiB at 8192x4096->128256). See autokernel.playbook.tuner.MEMORY_SHARE.
    race_slack = 0.05

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        if len(shape) not in (2, 3) or any(int(s) < 1 for s in shape):
            raise ValueError(f"linear_cross_entropy problem: shape must be [tokens, hidden, vocab] (or [tokens, "
                             f"hidden] with flag vocab) of positive sizes, got {shape}")
        try:
            vocab = int(shape[2]) if len(shape) == 3 else int(flags["vocab"])
        except KeyError:
            raise ValueError("linear_cross_entropy problem: a [tokens, hidden] shape needs flag vocab") from None
        except (TypeError, ValueError):
            raise ValueError(f"linear_cross_entropy problem: flag vocab must be an int, "
                             f"got {flags['vocab']!r}") from None
        if "vocab" in flags and int(flags["vocab"]) != vocab:
            raise ValueError(f"linear_cross_entropy problem: flag vocab={flags['vocab']} but the shape says {vocab}")
        if vocab < 1:
            raise ValueError(f"linear_cross_entropy problem: vocab must be positive, got {vocab}")
        self.rows, self.hidden, self.vocab = int(shape[0]), int(shape[1]), vocab
        self.reduction = str(flags.get("reduction", "mean"))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"linear_cross_entropy problem: flag reduction must be one of {REDUCTIONS}, "
                             f"got {self.reduction!r}")
        try:
            self.ignore_index = int(flags.get("ignore_index", -100))
            self.label_smoothing = float(flags.get("label_smoothing", 0.0))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"linear_cross_entropy problem: flags ignore_index (an int) and label_smoothing "
                             f"(a float): {exc}") from None
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"linear_cross_entropy problem: label_smoothing must be in [0, 1], "
                             f"got {self.label_smoothing}")
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        self.upcast = flag_bool(PATTERN, flags, "upcast", True) and self.dtype != torch.float32
        self.out_dtype = torch.float32 if self.upcast else self.dtype
        self.bias = flag_bool(PATTERN, flags, "bias", False)
        self.keep_logits = flag_bool(PATTERN, flags, "logits_out", False)
        self.flags = {"reduction": self.reduction, "ignore_index": self.ignore_index,
                      "label_smoothing": self.label_smoothing, "upcast": self.upcast, "bias": self.bias,
                      "vocab": self.vocab, "logits_out": self.keep_logits}
        self.key = pattern_key(self.reduction, self.ignore_index, self.label_smoothing, self.dtype, self.out_dtype,
                               self.bias, self.vocab, self.keep_logits)
        self._cases: dict[tuple, Case] = {}
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._refs: dict[int, dict[str, torch.Tensor]] = {}
        self._source_dir: str | None = None

    def describe(self) -> str:
        return (f"linear_cross_entropy {self.rows}x{self.hidden}->{self.vocab} {dtype_name(self.dtype)} "
                f"reduction={self.reduction} ignore_index={self.ignore_index} "
                f"label_smoothing={self.label_smoothing:g} upcast={self.upcast} bias={self.bias} "
                f"logits_out={self.keep_logits}")

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.rows, self.hidden, self.vocab, self.dtype).to_dict()

    def _chunks(self) -> list[int]:
        """Rows per chunk worth trying, largest first (fewer re-reads of ``dW``; fewer rows lose most: training
        8192x4096->128256 on an H100 took 44.11 ms at 1408 rows, 42.72 at 1024, 48.10 at 512, 63.40 at 256):
        multiples of the row tile, the buffer under the memory cap, no more rows than the batch holds (rounded up
        to the tile)."""
        cap = max_chunk_bytes(self.rows, self.hidden, self.vocab, self.dtype.itemsize)
        most = cap // (self.vocab * self.dtype.itemsize)
        batch = -(-self.rows // ROW_MULTIPLE) * ROW_MULTIPLE
        options = {r for r in (256, 512, 1024, 2048, 4096, 8192) if r <= most}
        options.add(max(ROW_MULTIPLE, most // ROW_MULTIPLE * ROW_MULTIPLE))
        return sorted({min(r, batch) for r in options}, reverse=True)

    def _slices(self) -> list[int]:
        """Vocabulary columns per gradient slice worth trying where the logits are kept (the training pass over
        them): powers of two whose ``[rows, cols]`` buffer is under the memory cap, and no wider than the
        vocabulary (rounded up to the row tile); none where the logits are not kept."""
        if not self.keep_logits:
            return []
        cap = max_chunk_bytes(self.rows, self.hidden, self.vocab, self.dtype.itemsize)
        widest = -(-self.vocab // ROW_MULTIPLE) * ROW_MULTIPLE
        return sorted({min(c, widest) for c in (2048, 4096, 8192, 16384, 32768)
                       if self.rows * c * self.dtype.itemsize <= cap})

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, config) pairs: the forward's chunk rows, then its cross-entropy launch; the training pass's
        chunk rows, then its launch (the tuner carries the forward's winner into the second phase)."""
        base = self.default_candidate()
        out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
        ce_blocks = [b for b in (1024, 2048, 4096, 8192, 16384, 32768) if b <= max(1024, self._block())]
        for rows in self._chunks():
            if rows != base["fwd_chunk_rows"]:
                out.append(("fwd", {**base, "fwd_chunk_rows": rows}))
        for block in ce_blocks:
            for warps in (4, 8, 16, 32):
                cand = {**base, "fwd_block_n": block, "fwd_num_warps": warps}
                if cand != base and CrossEntropyProblem._plausible(block, warps):
                    out.append(("fwd", cand))
        for rows in self._chunks():
            out.append(("bwd", {**base, "train_chunk_rows": rows}))
        for cols in self._slices():
            if cols != base["train_slice_cols"]:
                out.append(("bwd", {**base, "train_slice_cols": cols}))
        for block in ce_blocks:
            for warps in (4, 8, 16, 32):
                if CrossEntropyProblem._plausible(block, warps):
                    out.append(("bwd", {**base, "train_block_n": block, "train_num_warps": warps}))
        return out

    def _block(self) -> int:
        return 1 << max(self.vocab - 1, 0).bit_length()

    # ---- inputs and references ---------------------------------------------------------------
    def sweep_shapes(self, max_rows: int | None = None) -> list[tuple[int, int]]:
        """1 row, a few awkward row counts (not multiples of a chunk), the target rows; the hidden size one
        less on the small row counts (the vocabulary stays: a second weight of 128256 rows costs a GiB)."""
        rows, hidden = self.target_shape(max_rows)
        counts = sorted({1, 3, min(rows, 130), rows})
        narrower = [(r, hidden - 1) for r in counts if r <= 130] if hidden > 2 else []
        return [(r, hidden) for r in counts] + narrower

    def _weight(self, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One lm_head per hidden size, shared by the cases: at 128256 x 4096 each costs a GiB."""
        if hidden not in self._weights:
            # Drawn on the device (a GiB on the host is slow); meta (ak-tune's precompiler) has no generator.
            g = torch.Generator(device=self.device).manual_seed(4000 + hidden) if self.device.type != "meta" else None
            # Logits of standard deviation ~2 for unit hidden states, as a trained head gives.
            w = (torch.randn(self.vocab, hidden, generator=g, device=self.device) * (2.0 / hidden ** 0.5))
            b = (0.5 * torch.randn(self.vocab, generator=g, device=self.device)).to(self.dtype) if self.bias else None
            self._weights[hidden] = (w.to(self.dtype), b)
        return self._weights[hidden]

    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            g = torch.Generator(device="cpu").manual_seed(3000 + seed)
            pad = 7 if noncontiguous else 0
            x = torch.randn(rows, hidden + pad, generator=g) * scale
            if zero_row and rows:
                x[0] = 0
            x = x.to(self.dtype).to(self.device)[:, :hidden]
            if not noncontiguous:
                x = x.contiguous()
            labels = torch.randint(0, self.vocab, (rows,), generator=g)
            labels[2::IGNORE_EVERY] = self.ignore_index
            shape = (rows,) if self.reduction == "none" else ()
            dloss = torch.randn(shape, generator=g).to(self.out_dtype)
            w, b = self._weight(hidden)
            self._cases[key] = Case(x, w, b, labels.to(self.device), dloss.to(self.device))
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            ref = linear_cross_entropy_reference(case.x, case.weight, case.bias, case.labels, self.ignore_index,
                                                 self.label_smoothing, self.reduction, case.dloss, self.keep_logits)
            ref["loss_fwd"] = ref["loss"]
            self._refs[key] = ref
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[LinearCrossEntropyConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (the cross-entropy kernel pair's complete source) for
        agent-written kernels."""
        cfg = LinearCrossEntropyConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def _call(self, cfg, k, case: Case, grads: Grads, dloss_rows: torch.Tensor | None = None) -> Result:
        return linear_cross_entropy(case.x, case.weight, case.bias, case.labels, self.ignore_index,
                                    self.label_smoothing, self.reduction, self.out_dtype, cfg, grads=grads,
                                    keep_logits=self.keep_logits and dloss_rows is None, dloss_rows=dloss_rows,
                                    kernels=k)

    def _train(self, cfg, k, case: Case) -> tuple[Result, dict[str, torch.Tensor]]:
        """The training pass as the op and its backward run it: its forward's result and the gradients for
        ``case.dloss``."""
        grads = Grads(True, True, self.bias)
        if self.reduction == "none":
            fwd = self._call(cfg, k, case, Grads(False, False, False))
            r = self._call(cfg, k, case, grads, dloss_rows=case.dloss)
            got = {"dx": r.dx, "dw": r.dw, "db": r.db}
        else:
            fwd = self._call(cfg, k, case, grads)
            got = {"dx": fwd.dx * case.dloss, "dw": fwd.dw * case.dloss,
                   "db": fwd.db * case.dloss if fwd.db is not None else None}
        return fwd, {name: t for name, t in got.items() if t is not None}

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        """The forward alone (``loss_fwd``, and ``logits`` when kept) and the training pass (``loss``, ``dx``,
        ``dw``, ``db``)."""
        cfg, k = self._kernels(config)
        fwd_only = self._call(cfg, k, case, Grads(False, False, False))
        fwd, grads = self._train(cfg, k, case)
        out = {"loss_fwd": fwd_only.loss, "loss": fwd.loss, **grads}
        if self.keep_logits:
            out["logits"] = fwd_only.logits
        return out

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The tolerance row for an output: the coarsest dtype that output passed through.

        The logits pass through their dtype: cuBLAS's float32 sums and the reference's float64 ones round a
        few logits to neighbouring bf16 values, which moves a row's loss by a unit of its label's logit. A
        reduced loss averages that away (the loss's own row holds); one loss per row ('none') keeps it, so
        it is held to the logits' row."""
        if output.startswith("loss"):
            return self.dtype if self.reduction == "none" else self.out_dtype
        return self.dtype

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, k = self._kernels(config)
        return {"fwd": lambda: self._call(cfg, k, case, Grads(False, False, False)),
                "train": lambda: self._train(cfg, k, case)}

    def eager(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              labels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This variant as a model writes it; what Inductor compiles in the race."""
        logits = torch.nn.functional.linear(x, weight, bias)
        z = logits.float() if self.upcast else logits
        loss = torch.nn.functional.cross_entropy(z, labels, ignore_index=self.ignore_index, reduction=self.reduction,
                                                 label_smoothing=self.label_smoothing)
        return (loss, logits) if self.keep_logits else loss

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        x = case.x.detach().requires_grad_(True)
        w = case.weight.detach().requires_grad_(True)  # detach: no copy of the head
        b = case.bias.detach().requires_grad_(True) if case.bias is not None else None

        def fwd():
            with torch.no_grad():
                return compiled(case.x, case.weight, case.bias, case.labels)

        def train():
            out = compiled(x, w, b, case.labels)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward(case.dloss)
            x.grad = w.grad = None
            if b is not None:
                b.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM (the passes are compute-bound: see the module docstring): the forward
        reads ``h``, ``W``, the bias and the labels (and writes the logits when kept); training also writes
        ``dh``, ``dW`` and ``db``."""
        s = self.dtype.itemsize
        params = (self.vocab * self.hidden + (self.vocab if self.bias else 0)) * s
        fwd = self.rows * self.hidden * s + params + self.rows * 8
        if self.keep_logits:
            fwd += self.rows * self.vocab * s
        return {"fwd": fwd, "train": fwd + self.rows * self.hidden * s + params}

    # ---- for the agent ---------------------------------------------------------------------
    def flops(self) -> dict[str, int]:
        """The matmuls' FLOPs: the logits (2 N H V) in the forward; training adds ``dh`` and ``dW``."""
        one = 2 * self.rows * self.hidden * self.vocab
        return {"fwd": one, "train": 3 * one}

    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract (the cross-entropy kernel the
        chunks run), the built-in source."""
        import inspect

        from autokernel.lowering.cross_entropy import kernels as ce_kernels
        from autokernel.lowering.linear_cross_entropy import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": ((kernels.__doc__ or "").strip() + "\n\nThe cross-entropy kernel:\n"
                          + (ce_kernels.__doc__ or "").strip()),
            "variant": f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                       f"label_smoothing={self.label_smoothing:g}, logits {dtype_name(self.dtype)}, "
                       f"loss {dtype_name(self.out_dtype)}, vocab {self.vocab}",
            "contract": (f"Define {FWD_KERNEL} and {BWD_KERNEL} (only the first runs here, on each chunk, with DX "
                         "the chunk's logits themselves: read a row whole before writing its gradient). "
                         + (SourceKernels.__doc__ or "")).strip(),
            "config_keys": LinearCrossEntropyConfig.keys_text(),
            "builtin_source": inspect.getsource(ce_kernels),
        }
