"""Rotary position embedding as a tuning problem for ``ak-tune``: inputs, reference, candidate runs, peers, bytes.

The tuner (``autokernel.playbook``) drives any problem through the same protocol and knows nothing of the
math; this module knows nothing of the tuner's search or of FX.

Shape and flags (``ak-tune --pattern rope --shape 4x32x4096x128 --flags kv_heads=8``):

- ``shape`` is q's shape as ``[B, heads, S, D]`` (what ``autokernel.explain`` reports for an instance,
  whatever the model's own layout), or ``[rows, D]`` with ``rows = B * heads * S`` (then B is 1 and the
  heads come from the flags);
- ``layout``: ``half`` (HF rotate_half, the default), ``interleaved`` (GPT-J), ``complex`` (Meta Llama's
  ``freqs_cis``: cos/sin are its float32 real and imaginary parts, one per pair; full rotary only) or
  ``deinterleave`` (DeepSeek's interleaved pairs written as halves; cos/sin one per pair) or ``half_pairs`` (GPT-OSS:
  ``half`` with cos/sin one per pair);
- ``rotary_dim``: the rotated columns (default D: all; less is partial rotary);
- ``heads``: q's heads (default: dim 1 of a 4-D shape); ``kv_heads``: k's heads (default: as many as q;
  ``0``: q alone);
- ``cs``: cos/sin dtype (default: the dtype; ``complex64`` for the complex layout); ``out``: the outputs' dtype
  (default: the promoted dtype; for the complex layout float32, or the dtype after ``type_as``).

The case is HF's: q and k as ``view(B, S, H, D).transpose(1, 2)`` (read in place), cos/sin ``[B, 1, S, R]``
gathered at random position ids. The kernel space: both passes are pure streams (read q, k, cos, sin; write
two outputs), so the knobs are heads per program (bytes in flight per program, and how many heads share one
load of cos/sin) and warps.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from autokernel.lowering.pattern import dtype_name
from autokernel.lowering.rope.kernels import (
    CS_PER_PAIR,
    LAYOUTS,
    RopeConfig,
    SourceKernels,
    default_config,
    dim_order,
    rope_apply_all,
    rope_bwd,
    rope_fwd,
    rope_reference,
)
from autokernel.lowering.rope.ops import KERNEL, PATTERN, pattern_key, source_kernels
from autokernel.lowering.row_problem import problem_dtype

BASE = 10000.0
_FP16_MAX_SCALE = 1e3  # RoPE's frequency base (Llama's); any base exercises the same kernel


@dataclass
class Case:
    q: torch.Tensor  # [B, H, S, D], strided as HF's transpose
    k: torch.Tensor | None
    cos: torch.Tensor  # [B, 1, S, R]
    sin: torch.Tensor
    dq: torch.Tensor  # upstream gradients of the outputs
    dk: torch.Tensor | None


def _int_flag(flags: dict[str, Any], name: str, default: int) -> int:
    value = flags.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"rope problem: flag {name} must be an integer, got {value!r}") from None


class RopeProblem:
    """One (variant, shape) to tune; see the module docstring for the shape and the flags."""

    pattern = PATTERN

    def __init__(self, flags: dict[str, Any], dtype: str, shape: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.dtype = problem_dtype(PATTERN, dtype, "dtype")
        if len(shape) not in (2, 4) or any(int(s) < 1 for s in shape):
            raise ValueError(f"rope problem: shape must be [B, heads, S, D] or [rows, D] of positive sizes, "
                             f"got {shape}")
        shape = [int(s) for s in shape]
        self.layout = flags.get("layout", "half")
        if self.layout not in LAYOUTS:
            raise ValueError(f"rope problem: flag layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.head_dim = shape[-1]
        self.heads = _int_flag(flags, "heads", shape[1] if len(shape) == 4 else 1)
        if len(shape) == 4 and self.heads != shape[1]:
            raise ValueError(f"rope problem: flag heads={self.heads} but the shape has {shape[1]} heads")
        if self.heads < 1:
            raise ValueError(f"rope problem: heads must be >= 1, got {self.heads}")
        self.kv_heads = _int_flag(flags, "kv_heads", self.heads)
        if self.kv_heads < 0:
            raise ValueError(f"rope problem: kv_heads must be >= 0, got {self.kv_heads}")
        self.rotary_dim = _int_flag(flags, "rotary_dim", self.head_dim)
        if self.rotary_dim < 2 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rope problem: rotary_dim must be even and in [2, {self.head_dim}], "
                             f"got {self.rotary_dim}")
        if self.layout == "complex":
            if flags.get("cs", "complex64") != "complex64" or self.rotary_dim != self.head_dim:
                raise ValueError("rope problem: the complex layout takes cs=complex64 and full rotary")
            self.cs_dtype, self.cs_real = torch.complex64, torch.float32
            self.out_dtype = problem_dtype(PATTERN, flags.get("out", "fp32"), "flag out")
        else:
            self.cs_dtype = self.cs_real = problem_dtype(PATTERN, flags.get("cs", dtype), "flag cs")
            promoted = dtype_name(torch.promote_types(self.dtype, self.cs_dtype))
            self.out_dtype = problem_dtype(PATTERN, flags.get("out", promoted), "flag out")
        if self.layout != "complex" and self.out_dtype != torch.promote_types(self.dtype, self.cs_dtype):
            raise ValueError(f"rope problem: flag out={dtype_name(self.out_dtype)} is not the promoted dtype of "
                             f"{dtype_name(self.dtype)} and cs={dtype_name(self.cs_dtype)}")
        self.batch = shape[0] if len(shape) == 4 else 1
        self.hidden = self.head_dim
        self.rows = math.prod(shape[:-1])
        self.flags = {"layout": self.layout, "rotary_dim": self.rotary_dim, "heads": self.heads,
                      "kv_heads": self.kv_heads, "cs": dtype_name(self.cs_dtype), "out": dtype_name(self.out_dtype)}
        self.key = pattern_key(self.layout, self.rotary_dim, self.head_dim, self.heads, self.kv_heads, self.dtype,
                               self.cs_dtype, self.out_dtype)
        self._cases: dict[tuple, Case] = {}
        self._refs: dict[int, dict[str, torch.Tensor]] = {}
        self._source_dir: str | None = None

    def describe(self) -> str:
        rot = "" if self.rotary_dim == self.head_dim else f" rotary_dim={self.rotary_dim}"
        return (f"rope {self.rows}x{self.head_dim} {dtype_name(self.dtype)} layout={self.layout} heads={self.heads} "
                f"kv_heads={self.kv_heads}{rot}")

    # ---- candidates --------------------------------------------------------------------------
    def default_candidate(self) -> dict[str, Any]:
        return default_config(self.hidden, self.rows, self.dtype).to_dict()

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, config) pairs: the forward's knobs first (backward at default), then the backward's.
        Kept to 2 to 64 columns per thread (fewer leaves loads unissued, more spills). Nearest the default first
        (larger blocks before smaller at the same distance): a short budget, or the tuner's plateau rule, ends a
        phase after a few candidates, and blocks of one or two heads were first before and never competitive on
        an H100 (4x32x4096x128 ended after the default alone)."""
        base = self.default_candidate()
        most = max(self.heads, self.kv_heads, 1)

        def distance(block_h: int, warps: int, phase: str) -> tuple[float, int]:
            return (abs(math.log2(block_h / base[f"{phase}_block_h"]))
                    + abs(math.log2(warps / base[f"{phase}_num_warps"])), -block_h)

        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < 2 * most]
        out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
        for phase in ("fwd", "bwd"):
            pairs = [(b, w) for b in sizes for w in (1, 2, 4, 8) if 2 <= b * self.head_dim // (32 * w) <= 64]
            for block_h, warps in sorted(pairs, key=lambda bw: distance(*bw, phase)):
                cand = {**base, f"{phase}_block_h": block_h, f"{phase}_num_warps": warps}
                if cand != base or phase == "bwd":
                    out.append((phase, cand))
        return out

    # ---- inputs and references ---------------------------------------------------------------
    def target_shape(self, max_rows: int | None = None) -> tuple[int, int]:
        return (min(self.rows, max_rows) if max_rows else self.rows, self.head_dim)

    def sweep_shapes(self, max_rows: int | None = None) -> list[tuple[int, int]]:
        """One token (decode), a few awkward token counts, and the target rows (rows are q's: tokens x heads)."""
        rows, hidden = self.target_shape(max_rows)
        counts = sorted({self.heads, 3 * self.heads, min(rows, 37 * self.heads), rows})
        return [(r, hidden) for r in counts]

    def _batch_and_seq(self, rows: int) -> tuple[int, int]:
        tokens = -(-rows // self.heads)
        batch = self.batch if tokens % self.batch == 0 else 1
        return batch, tokens // batch

    def case(self, rows: int, hidden: int, *, scale: float = 1.0, zero_row: bool = False,
             noncontiguous: bool = False, seed: int = 0) -> Case:
        """q's rows (tokens x heads) and width; ``scale`` multiplies q and k; ``zero_row`` zeroes the first
        token; ``noncontiguous`` pads the heads' rows (q and k as slices of wider tensors)."""
        key = (rows, hidden, scale, zero_row, noncontiguous, seed)
        if key not in self._cases:
            if hidden != self.head_dim:
                raise ValueError(f"rope problem: width {hidden} != head_dim {self.head_dim}")
            g = torch.Generator(device="cpu").manual_seed(3000 + seed)
            if torch.float16 in (self.dtype, self.out_dtype):
                # fp16 tops out at 65504: |x1| + |x2| of q at 1e4 would overflow the outputs themselves.
                scale = min(scale, _FP16_MAX_SCALE)
            batch, seq = self._batch_and_seq(rows)
            pad = 6 if noncontiguous else 0

            def heads_view(h: int) -> torch.Tensor:
                t = torch.randn(batch, seq, h, hidden + pad, generator=g) * scale
                if zero_row and seq:
                    t[:, 0] = 0
                return t.to(self.dtype).to(self.device)[..., :hidden].transpose(1, 2)

            q = heads_view(self.heads)
            k = heads_view(self.kv_heads) if self.kv_heads else None
            positions = torch.randint(0, 4 * max(seq, 1), (batch, seq), generator=g).double()
            inv_freq = 1.0 / BASE ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim)
            angles = positions[..., None] * inv_freq
            emb = {"half": torch.cat((angles, angles), -1), "interleaved": angles.repeat_interleave(2, dim=-1),
                   "complex": angles, "deinterleave": angles, "half_pairs": angles}[self.layout]
            cos = emb.cos().to(self.cs_real).to(self.device)[:, None]
            sin = emb.sin().to(self.cs_real).to(self.device)[:, None]
            dq = torch.randn(q.shape, generator=g).to(self.out_dtype).to(self.device)
            dk = torch.randn(k.shape, generator=g).to(self.out_dtype).to(self.device) if k is not None else None
            self._cases[key] = Case(q, k, cos, sin, dq, dk)
        return self._cases[key]

    def reference(self, case: Case) -> dict[str, torch.Tensor]:
        key = id(case)
        if key not in self._refs:
            q = case.q.detach().double().requires_grad_(True)
            k = case.k.detach().double().requires_grad_(True) if case.k is not None else None
            qo, ko = rope_reference(q, k, case.cos, case.sin, self.layout, self.rotary_dim)
            if k is None:
                qo.backward(case.dq.double())
                self._refs[key] = {"q": qo.detach(), "dq": q.grad}
            else:
                torch.autograd.backward((qo, ko), (case.dq.double(), case.dk.double()))
                self._refs[key] = {"q": qo.detach(), "k": ko.detach(), "dq": q.grad, "dk": k.grad}
        return self._refs[key]

    def _kernels(self, candidate: dict[str, Any]) -> tuple[RopeConfig, SourceKernels | None]:
        """A candidate is a config dict, plus ``"source"`` (complete kernel source) for agent-written kernels."""
        cfg = RopeConfig.from_dict({k: v for k, v in candidate.items() if k != "source"})
        if "source" not in candidate:
            return cfg, None
        if self._source_dir is None:
            self._source_dir = tempfile.mkdtemp(prefix="autokernel-candidates-")
        return cfg, source_kernels(self._source_dir, candidate["source"])

    def _fwd(self, case: Case, cfg: RopeConfig, k: SourceKernels | None):
        return rope_fwd(case.q, case.k, case.cos, case.sin, self.layout, self.rotary_dim, self.out_dtype, cfg, k)

    def _bwd(self, case: Case, cfg: RopeConfig, k: SourceKernels | None):
        # The gradients in q's and k's layouts, as the training op writes them.
        orders = (dim_order(case.q), dim_order(case.k) if case.k is not None else None)
        return rope_bwd(case.dq, case.dk, case.cos, case.sin, self.layout, self.rotary_dim, self.dtype, cfg, k,
                        out_orders=orders)

    def run(self, config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
        cfg, kernels = self._kernels(config)
        qo, ko = self._fwd(case, cfg, kernels)
        dq, dk = self._bwd(case, cfg, kernels)
        if ko is None:
            return {"q": qo, "dq": dq}
        return {"q": qo, "k": ko, "dq": dq, "dk": dk}

    def tolerance_dtype(self, output: str) -> torch.dtype:
        """The inputs' precision bounds every output (a float32 output of bf16 inputs is only more exact)."""
        del output
        return self.dtype

    # ---- timing ----------------------------------------------------------------------------
    def timed(self, config: dict[str, Any], case: Case) -> dict[str, Any]:
        """Callables for the passes the tuner times: forward alone, and forward + backward."""
        cfg, kernels = self._kernels(config)

        def fwd():
            return self._fwd(case, cfg, kernels)

        def train():
            self._fwd(case, cfg, kernels)
            return self._bwd(case, cfg, kernels)

        return {"fwd": fwd, "train": train}

    def eager(self, q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        """This variant as a model writes it (HF ``q * cos + rotate_half(q) * sin``, partial and interleaved
        alike; Meta Llama's ``view_as_complex(q) * freqs_cis``); what Inductor compiles in the race."""
        xs = (q,) if k is None else (q, k)
        # Both inputs are read before either is rotated, as models do: the in-context race needs the matcher to
        # pair q with k here as it does in a model (read in turn, they were two unpaired instances and the race
        # found no entry to serve: session 6's RoPE "inductor wins" beside a faster kernel).
        if self.layout == "complex":
            freqs = torch.complex(cos, sin)
            pairs = [torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) for x in xs]
            out = [torch.view_as_real(xc * freqs).flatten(-2).to(self.out_dtype) for xc in pairs]
        else:
            out = rope_apply_all(xs, cos, sin, self.layout, self.rotary_dim)
        return out[0] if k is None else tuple(out)

    def peer_passes(self, compiled, case: Case) -> dict[str, Any]:
        """Forward and forward+backward callables of a compiled :meth:`eager` (Inductor's race entry)."""
        q = case.q.detach().clone().requires_grad_(True)
        k = case.k.detach().clone().requires_grad_(True) if case.k is not None else None

        def fwd():
            with torch.no_grad():
                return compiled(case.q, case.k, case.cos, case.sin)

        def train():
            out = compiled(q, k, case.cos, case.sin)
            if k is None:
                out.backward(case.dq)
            else:
                torch.autograd.backward(out, (case.dq, case.dk))
            q.grad = None
            if k is not None:
                k.grad = None

        return {"fwd": fwd, "train": train}

    def bytes_moved(self) -> dict[str, int]:
        """Fewest bytes that must cross DRAM: fwd reads q, k, cos and sin and writes the two outputs; bwd
        reads the outputs' gradients, cos and sin and writes the gradients of q and k."""
        tokens = self.rows // self.heads
        heads_total = self.heads + self.kv_heads
        qk = tokens * heads_total * self.head_dim
        width = self.rotary_dim // 2 if self.layout in CS_PER_PAIR else self.rotary_dim  # values per position
        cs = 2 * tokens * width * self.cs_real.itemsize
        fwd = qk * self.dtype.itemsize + qk * self.out_dtype.itemsize + cs
        return {"fwd": fwd, "train": 2 * fwd}

    # ---- for the agent ---------------------------------------------------------------------
    def agent_brief(self) -> dict[str, str]:
        """What the tuning agent reads: the task, the math, the kernel contract, the built-in source."""
        import inspect

        from autokernel.lowering.rope import kernels

        return {
            "title": f"{self.describe()}, forward and backward",
            "semantics": (kernels.__doc__ or "").strip(),
            "variant": f"layout={self.layout} (INTERLEAVED={kernels.PAIR_CODE[self.layout]}, CS_PAIRS="
                       f"{self.layout in kernels.CS_PER_PAIR}), rotary_dim="
                       f"{self.rotary_dim} of {self.head_dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                       f"{dtype_name(self.dtype)} in, cos/sin {dtype_name(self.cs_dtype)}, "
                       f"{dtype_name(self.out_dtype)} out",
            "contract": (f"Define {KERNEL}. " + (kernels.SourceKernels.__doc__ or "")).strip(),
            "config_keys": RopeConfig.keys_text(),
            "builtin_source": inspect.getsource(kernels),
        }
