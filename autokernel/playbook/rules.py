"""The playbook's knowledge, as data: how to write fast memory-bound kernels, and what each pattern taught us.

Three layers, each kept where it belongs:

- :data:`RULES`: general rules for memory-bound row kernels (one pass over DRAM, vectorized loads, rows per
  program, split reductions, persistent grids, fp32 accumulation, saved statistics, per-SM partial weight
  gradients, launch knobs on Hopper), each with the knobs it acts through, where the rule comes from, and
  what we measured about it and on which GPU (:class:`Observation`).
- :data:`CHAPTERS`: per pattern, which rules apply and what was measured on it. A pattern without a
  chapter (a family added since) gets every rule.
- The problem object of the pattern's family (``autokernel/lowering/<family>/problem.py``): the reference
  semantics, the kernel family and its parameter space, and the bytes that must cross DRAM (the floor).
  :func:`playbook_for` reads them from the problem; this module imports no pattern's math.

What each tuning run learns on a GPU (winning configs per shape, failed candidates and why) is not
written here but appended to that GPU's notes store (:mod:`autokernel.playbook.notes`).
The agent reads all of it (``read_task``); ``ak-tune --playbook [--pattern P]`` prints the rules.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Observation:
    """One measurement behind a rule or a pattern chapter."""

    finding: str
    gpu: str  # the card it was measured on, with the software stack
    source: str  # where the numbers are (a file of this repository)


@dataclass(frozen=True)
class Rule:
    key: str
    title: str
    advice: str
    knobs: tuple[str, ...] = ()  # config keys (or kernel features) the rule acts through
    origin: str = ""  # where the rule comes from when not (only) from our measurements
    observed: tuple[Observation, ...] = ()


@dataclass(frozen=True)
class Chapter:
    pattern: str
    rules: tuple[str, ...]  # keys of RULES that apply, most important first
    observed: tuple[Observation, ...] = ()


H100 = "NVIDIA H100 80GB HBM3 (torch 2.11, triton 3.6)"
H200 = "NVIDIA H200 (torch 2.11, triton 3.6)"
NOTES_MD = "benchmarks/NOTES.md"
TUNE_H100 = "benchmarks/results/rms_norm_tune_h100.txt"

RULES: dict[str, Rule] = {rule.key: rule for rule in (
    Rule("one-pass", "One pass over DRAM",
         "Read each input and write each output once per pass: hold the row in registers, fuse the casts, the "
         "residual add and the weight into the same kernel, and compare the time with the floor (bytes that "
         "must move / measured copy bandwidth). A second read of a row is only cheap while few rows are in "
         "flight (it then comes from L2).",
         knobs=("block_n",), origin="Triton tutorials 02 (fused softmax) and 05 (layer norm)",
         observed=(Observation("rms_norm 8192x8192 bf16 forward at 95% of the floor (0.0943 ms, floor 0.089)",
                               H100, NOTES_MD),)),
    Rule("vectorized-loads", "Vectorized loads",
         "Contiguous rows, a unit column stride and a power-of-two block let Triton issue 16-byte loads; mask "
         "only the tail columns. Pass strides, do not call .contiguous() on the input.",
         knobs=("block_n",),
         observed=(Observation("clamping tail rows instead of folding the row bound into the column mask left "
                               "the rms_norm forward unchanged (0.0711 vs 0.0709 ms): the mask was not the limiter",
                               H200, NOTES_MD),)),
    Rule("rows-per-program", "Several rows per program for small rows",
         "Rows of a few thousand elements or fewer leave one program too little work: give a program several "
         "rows to amortize its start-up and the weight load; fewer warps per row.",
         knobs=("fwd_rows_per_program", "fwd_num_warps"),
         observed=(Observation("rms_norm 2048x1024 and 2048x4096: still 2x slower than Inductor in the forward "
                               "after tuning (0.069 vs 0.036 ms, 0.032 vs 0.018 ms); not yet explained",
                               H100, TUNE_H100),)),
    Rule("split-huge-rows", "Chunk or split the reduction of huge rows",
         "Rows of 16K elements and wider spill registers when a program holds the whole row (and dy, and the "
         "weight, and a partial dW in the backward): stream the row in chunks (a second read) or split its "
         "reduction over several programs.",
         knobs=("block_n", "fwd_block_n", "bwd_split_n", "bwd_num_warps"),
         observed=(Observation("single-pass rms_norm fwd+bwd 2048x16384: 1.17 ms vs Inductor 0.30; 2048x32768: "
                               "2.67 ms vs 0.80 (Inductor wins): the backward spills; chunked candidates were "
                               "added for rows >= 16384", H100, TUNE_H100),
                   Observation("rms_norm 2048x32768 after 1.5 minutes of ak-tune: best chunked backward "
                               "(block_n 8192, 16 warps x 1 program per SM) 0.50 ms fwd+bwd vs Inductor 0.35; its "
                               "forward chunked too (0.134 ms; whole row 0.098): the forward now chunks on its "
                               "own (fwd_block_n), and the split backward (bwd_split_n: row dot products, then "
                               "column blocks x row groups) was added", H100,
                               "benchmarks/results/rms_norm_tune_2048x32768_h100.tsv"),
                   Observation("rms_norm backward alone, 2048x32768: split (bwd_split_n 2048, 4 warps x 4 programs "
                               "per SM) 0.241 ms, best chunked 0.363, single pass 2.1 (spills), Inductor 0.247; "
                               "2048x16384: single pass 16 warps x 1 program per SM 0.101, best split 0.130; the "
                               "defaults at those widths are these, and fwd+bwd ties Inductor at 32768 (0.333 "
                               "vs 0.332) and beats it at 16384 (0.148 vs 0.177)", H100,
                               "benchmarks/results/rms_norm_sweep_wide_h100_s14.txt"))),
    Rule("persistent-grid", "Persistent grid for the backward",
         "Launch programs_per_sm x SMs programs that loop over rows: more programs hide latency, fewer shrink "
         "the per-program partial buffers and their final reduction. Prefetching the next row hides load "
         "latency while the row fits in registers.",
         knobs=("bwd_programs_per_sm", "bwd_num_warps"),
         observed=(Observation("prefetching the next row in the persistent rms_norm backward: fwd+bwd 0.2124 -> "
                               "0.1940 ms (-9%) at 8192x8192", H200, NOTES_MD),
                   Observation("the same prefetch at 2048x16384 spilled registers (fwd+bwd 1.17 ms); now "
                               "only rows <= 8192 wide prefetch (not yet measured)", H100, NOTES_MD),
                   Observation("rms_norm backward alone, GPU time, warps x programs per SM: 8192x2048 best 4 x 4 "
                               "(0.0460 ms), 8 x 4 0.0547, 1 x 1 0.1165; 8192x4096 best 8 x 2 (0.0677), 16 x 2 "
                               "0.0823, 1-2 warps 0.8-1.2 ms (the row spills): about 16 warps per SM, 8 "
                               "elements per thread", H200, NOTES_MD))),
    Rule("fp32-accumulation", "Accumulate in fp32",
         "Sums, means, sums of squares and dot products accumulate in float32 whatever the input dtype; cast "
         "the result once at the store. Cast Python float scalars (eps, offsets) to fp32 inside the kernel: "
         "fp64 promotion halved Liger's speed under Inductor.",
         origin="Liger-Kernel PR #1350; DESIGN.md"),
    Rule("save-statistics", "Save per-row statistics for the backward",
         "In training, the forward stores one float per row (rstd for RMSNorm, mean and rstd for LayerNorm, "
         "logsumexp for cross-entropy; softmax keeps its output) so the backward does not redo the reduction. "
         "A forward without grad saves nothing.",
         knobs=("save_rstd",), origin="Liger-Kernel rms_norm.py, cross_entropy.py; Triton tutorial 05"),
    Rule("partial-weight-grads", "Per-program partial sums for weight gradients",
         "dW (and dB) sum over every row: each program of the persistent backward accumulates its rows into "
         "one float32 partial row ([P, H]), then a small reduction sums the P partials. Deterministic, no "
         "atomics. LayerNorm's reduction is a kernel of its own with its own tile (columns a program, partial "
         "rows a step, warps); RMSNorm's is a sum that Inductor compiles.",
         knobs=("bwd_programs_per_sm", "sum_block_n", "sum_block_p", "sum_num_warps"),
         origin="Liger-Kernel rms_norm.py (per-SM partial dW)",
         observed=(Observation("layer_norm 8192x4096: the two partial buffers (2 x SMs x H float32) cost about "
                               "6 us of a 0.136 ms fwd+bwd", H200, NOTES_MD),)),
    Rule("hopper-launch", "Launch knobs on Hopper",
         "Keep 2-64 elements per thread (num_warps from the row width); num_stages 1-2 for row kernels (no "
         "K loop to pipeline); eviction hints (evict_first on inputs read once, evict_last on the weight) are "
         "a candidate, not yet measured here.",
         knobs=("fwd_num_warps", "bwd_num_warps", "num_stages"),
         origin="Triton documentation; not measured by autokernel yet for eviction hints"),
)}

CHAPTERS: dict[str, Chapter] = {chapter.pattern: chapter for chapter in (
    Chapter("rms_norm", ("one-pass", "save-statistics", "partial-weight-grads", "persistent-grid",
                         "split-huge-rows", "rows-per-program", "vectorized-loads", "fp32-accumulation",
                         "hopper-launch"),
            (Observation("8192x8192 bf16: fwd+bwd 0.198 ms GPU time vs Liger 0.258, Inductor 0.319", H200, NOTES_MD),
             Observation("add + RMSNorm 8192x4096: fwd+bwd 0.201 ms (Inductor 0.205, Liger 0.235)", H200,
                         NOTES_MD))),
    Chapter("layer_norm", ("one-pass", "save-statistics", "partial-weight-grads", "persistent-grid",
                           "split-huge-rows", "rows-per-program", "vectorized-loads", "fp32-accumulation",
                           "hopper-launch"),
            (Observation("8192x4096: fwd 0.045 ms vs Liger 0.042; fwd+bwd 0.136 ms vs Liger 0.155 (short "
                         "tuning budget: the backward phase was hardly reached)", H200, NOTES_MD),)),
    Chapter("softmax", ("one-pass", "save-statistics", "split-huge-rows", "rows-per-program", "vectorized-loads",
                        "fp32-accumulation", "hopper-launch"),
            (Observation("8192x8192: fwd+bwd 0.166 ms GPU time, tied with Liger, Inductor 0.252", H200,
                         NOTES_MD),)),
    Chapter("cross_entropy", ("one-pass", "save-statistics", "split-huge-rows", "fp32-accumulation",
                              "hopper-launch"),
            (Observation("8192x128256: fwd 0.705 ms vs Inductor 1.350, Liger 0.919; fwd+bwd lost the race "
                         "(Inductor 2.60 ms) when the forward wrote the gradient and the backward read it again "
                         "to scale it (four logits-sized passes); the family now saves (max, log-sum-exp) and "
                         "recomputes the gradient in the backward (three)", H200, NOTES_MD),)),
    Chapter("swiglu", ("one-pass", "vectorized-loads", "fp32-accumulation", "hopper-launch"),
            (Observation("8192x14336: Inductor is already at the DRAM floor in both passes; the race keeps "
                         "Inductor, and the goal is to lose nothing", H200, NOTES_MD),)),
)}


def rules_for(pattern: str) -> list[Rule]:
    """The rules that apply to ``pattern``, most important first; every rule for a pattern without a chapter."""
    chapter = CHAPTERS.get(pattern)
    return [RULES[key] for key in chapter.rules] if chapter else list(RULES.values())


def parameter_space(candidates: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, list[Any]]]:
    """Per search phase, each knob's values among a problem's candidates."""
    space: dict[str, dict[str, set]] = {}
    for phase, config in candidates:
        for knob, value in config.items():
            space.setdefault(phase, {}).setdefault(knob, set()).add(value)
    def order(value: Any) -> tuple[bool, Any]:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (not number, value if number else repr(value))

    return {phase: {knob: sorted(values, key=order) for knob, values in knobs.items()}
            for phase, knobs in space.items()}


def playbook_for(problem: Any) -> dict[str, Any]:
    """The playbook for one problem, as plain data: its family's kernel space, floor formula and bytes and
    parameter space (from the problem object), the rules that apply and the pattern's measurements."""
    pattern = getattr(problem, "pattern", "")
    chapter = CHAPTERS.get(pattern)
    module = sys.modules.get(type(problem).__module__)
    return {
        "pattern": pattern,
        "variant": problem.describe() if hasattr(problem, "describe") else "",
        "kernel_family": inspect.cleandoc(getattr(module, "__doc__", None) or ""),
        "floor": {"formula": inspect.getdoc(problem.bytes_moved) or "", "bytes": problem.bytes_moved(),
                  "how": "floor ms = bytes / measured device-to-device copy bandwidth"},
        "default_config": problem.default_candidate(),
        "parameter_space": parameter_space(problem.candidates()),
        "rules": [asdict(rule) for rule in rules_for(pattern)],
        "measured": [asdict(o) for o in (chapter.observed if chapter else ())],
    }


def render(pattern: str | None = None) -> str:
    """The rules (for one pattern, or all of them with every chapter's measurements) as text."""
    lines = []
    for rule in rules_for(pattern) if pattern else RULES.values():
        lines.append(f"{rule.key}: {rule.title}")
        lines.append(f"  {rule.advice}")
        if rule.knobs:
            lines.append(f"  knobs: {', '.join(rule.knobs)}")
        if rule.origin:
            lines.append(f"  from: {rule.origin}")
        lines += [f"  measured on {o.gpu}: {o.finding} ({o.source})" for o in rule.observed]
    for chapter in CHAPTERS.values() if pattern is None else [c for c in (CHAPTERS.get(pattern),) if c]:
        lines.append(f"{chapter.pattern}: {', '.join(chapter.rules)}")
        lines += [f"  measured on {o.gpu}: {o.finding} ({o.source})" for o in chapter.observed]
    return "\n".join(lines)
