"""What the families' tuning problems share: dtype and flag parsing, and for the row-wise ones a
(rows, hidden) target, the shapes the checks sweep, and the elements-per-thread rule that prunes launch
configurations. Each family's problem class keeps its own math (reference, kernels, floor); the tuner
knows none of this."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def problem_dtype(pattern: str, name: str, what: str) -> torch.dtype:
    """The dtype a problem's flag or argument ``what`` names; ValueError naming it otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{pattern} problem: {what} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def flag_bool(pattern: str, flags: dict[str, Any], name: str, default: bool) -> bool:
    """A true/false flag given as a bool or as text (``1``/``true``/``yes``, ``0``/``false``/``no``)."""
    value = flags.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError(f"{pattern} problem: flag {name} must be true or false, got {value!r}")


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plausible_warps(block: int, warps: int) -> bool:
    """Whether ``warps`` warps suit a ``block``-wide row tile: fewer than ~1 or more than ~64 elements per
    thread wastes lanes or spills registers (one warp on a tiny row is allowed: nothing smaller exists)."""
    per_thread = block / (warps * 32)
    return 1 <= per_thread <= 64 or (warps == 1 and per_thread < 1)


class RowProblem:
    """Base of a problem over ``rows`` independent rows of ``hidden`` elements."""

    rows: int
    hidden: int

    def target_shape(self, max_rows: int | None = None) -> tuple[int, int]:
        return (min(self.rows, max_rows) if max_rows else self.rows, self.hidden)

    def sweep_shapes(self, max_rows: int | None = None) -> list[tuple[int, int]]:
        """1 row, a few awkward row counts, a non-power-of-two width, and the target (large) rows."""
        rows, hidden = self.target_shape(max_rows)
        widths = [hidden] + ([hidden - 1] if hidden > 2 else [])
        counts = sorted({1, 3, min(rows, 130), rows})
        return [(r, h) for h in widths for r in counts]


def norm_candidates(base: dict[str, Any], hidden: int) -> list[tuple[str, dict[str, Any]]]:
    """(phase, config) pairs of the normalization families (one forward program per row group, a persistent
    backward with per-program partial weight gradients): the forward's knobs first (backward at
    ``base``), then the backward's. The tuner fills in the backward phase's forward knobs with the forward
    phase's winner."""
    block = next_pow2(hidden)
    out: list[tuple[str, dict[str, Any]]] = [("fwd", base)]
    for warps in (1, 2, 4, 8, 16, 32):
        for rpp in (1, 2, 4):
            cand = {**base, "fwd_num_warps": warps, "fwd_rows_per_program": rpp}
            if cand != base and plausible_warps(block, warps):
                out.append(("fwd", cand))
    if hidden >= 16384:
        # The forward read in chunks, twice (each pass has its own chunk width).
        for block_n in (4096, 8192):
            for warps in (8, 16):
                out.append(("fwd", {**base, "fwd_block_n": block_n, "fwd_num_warps": warps}))
    # The single-pass backward holds x, dy, w and the partial sums of a whole row in registers (the chunked
    # and split knobs cleared: a wide base may set them).
    no_split = {"bwd_split_n": 0} if "bwd_split_n" in base else {}
    single = [("bwd", {**base, **no_split, "block_n": 0, "bwd_num_warps": warps, "bwd_programs_per_sm": pps})
              for warps in (1, 2, 4, 8, 16, 32) for pps in (1, 2, 4, 8, 16)
              if plausible_warps(block, warps) and warps * pps <= 64]
    if hidden < 16384:
        return out + single
    wide = []
    if "bwd_split_n" in base:
        # The split backward (RMSNorm): each row's dot product first, then column blocks x row groups, the
        # weight gradient's share in registers. On an H100 (session 14's sweep, backward alone) its best at
        # 2048x32768 was column blocks of 2048 at 4 warps x 4 programs per SM (0.241 ms; 4096: 0.242; 1024:
        # 0.256; 512: 0.294); the chunked backward's best took 0.363.
        wide += [("bwd", {**base, "bwd_split_n": split_n, "bwd_num_warps": warps, "bwd_programs_per_sm": pps})
                 for split_n in (2048, 4096, 1024) for warps in (4, 8) for pps in (4, 2)]
    # The chunked kernels read the row twice but keep each chunk in registers.
    wide += [("bwd", {**base, **no_split, "block_n": block_n, "bwd_num_warps": warps, "bwd_programs_per_sm": pps})
             for block_n in (2048, 4096, 8192) for warps in (4, 8, 16) for pps in (1, 2, 4)]
    if block < 32768:
        # At 2048x16384 the whole row still fits: 16 warps x 1 program per SM took 0.101 ms, the best split
        # 0.130, the best chunked 0.138 (same sweep).
        return out + single + wide
    # From 32768 columns the single-pass backward spills (2048x32768: 2.1-3.0 ms against the split's 0.241): last.
    return out + wide + single
