"""One training step of bench_e2e.py's Llama-style model on every GPU of a host: DDP or FSDP2.

Usage (device machine with N GPUs)::

    torchrun --nproc-per-node N benchmarks/bench_ddp.py --wrap ddp|fsdp2 [--impls eager,inductor,autokernel]
        [--cache-dir DIR] [--out benchmarks/results] [--iters 10]
    torchrun --nproc-per-node 2 benchmarks/bench_ddp.py --smoke --wrap ddp   # CPU, gloo, tiny config

The model and the batch are bench_e2e.py's (``build``, ``FULL``; ``SMOKE`` with ``--smoke``), the same
batch on every rank, so every rank must compute the same loss: the script fails (exit 1) when they
differ by more than ``LOSS_RTOL``, or when the ranks' backends made different decisions. ``--wrap ddp``:
``torch.compile(DistributedDataParallel(model))`` (Dynamo's DDPOptimizer splits the graph at the
gradient buckets, so the backend sees one graph per bucket). ``--wrap fsdp2``: ``fully_shard`` on each
decoder layer and on the whole model, then ``torch.compile(model)`` (Dynamo breaks the graph at each
sharded module's hooks). Each impl runs a fresh copy of the weights as bench_e2e.py times one step: the
first step (compile included; Inductor's FX-graph and AOTAutograd caches off), two warm-up steps, the
median of ``--iters`` steps; per rank, gathered on rank 0. A row's ``ms`` is the slowest rank's median
and ``peak_mib`` the largest rank's peak above the weights (both per GPU), with every rank's in
``ms_per_rank`` / ``peak_mib_per_rank``. For autokernel, ``instances`` counts what the backend decided
per pattern instance while compiling (its compile-time log, on every rank; all ranks must agree). An impl
that fails on every rank becomes an error row; one that fails on some ranks only leaves the others waiting
in a collective until the process group times out.

Rank 0 writes ``<out>/llama-step-<wrap>.json`` (``BENCH_FORMAT.md``: pattern ``llama-step-ddp`` or
``llama-step-fsdp2``, case as bench_e2e.py's, ``world_size``, ``tokens_per_s`` over all GPUs) and the
``.md`` table. ``--smoke`` runs on the CPU (gloo, the Triton interpreter; its times mean nothing) to test
the plumbing; launch it with ``torchrun --nproc-per-node 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Required on the lent multi-GPU machine: NCCL's NVLink SHARP (NVLS) and symmetric-memory multicast fail
# there. Set before torch.distributed creates a communicator.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_e2e import (  # noqa: E402
    FULL,
    SMOKE,
    build,
    case_name,
    compile_cold,
    compiled,
    describe_run,
    measure_step,
    parse_step_args,
    results_dir,
    step_parser,
)

IMPLS = ("eager", "inductor", "inductor-max-autotune", "autokernel")
WRAPS = ("ddp", "fsdp2")
LOSS_RTOL = 1e-5  # same weights, same batch, same GPU model: the ranks' losses agree to rounding


class _Planned(logging.Handler):
    """Counts what the backend decided for each pattern instance it planned, from its compile-time log lines
    ("autokernel: <pattern> <status> ...")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        words = record.getMessage().split()
        if len(words) > 2 and words[0] == "autokernel:":
            self.counts[f"{words[1]}:{words[2]}"] += 1


def wrapped(wrap: str, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DDP, or sharded in place by FSDP2 over all ranks."""
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def time_wrapped(impl: str, wrap: str, dims: dict[str, int], iters: int, device: torch.device,
                 cache_dir: str | None) -> dict[str, Any]:
    """This rank's measurement of one impl: a fresh model (the same weights on every rank), wrapped, compiled."""
    torch._dynamo.reset()
    model, inputs = build(dims, device)
    planned = _Planned()
    logger = logging.getLogger("autokernel")
    level = logger.level
    logger.addHandler(planned)
    logger.setLevel(logging.INFO)
    try:
        row = measure_step(compiled(impl, wrapped(wrap, model, device), cache_dir), model, inputs, iters, device)
    finally:
        logger.removeHandler(planned)
        logger.setLevel(level)
    if impl == "autokernel":
        row["instances"] = dict(sorted(planned.counts.items()))
    return row


def merge_ranks(impl: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's measurement; raises AssertionError when the ranks disagree."""
    losses = [r["loss"] for r in per_rank]
    assert max(losses) - min(losses) <= LOSS_RTOL * abs(losses[0]), f"{impl}: the ranks' losses differ: {losses}"
    decisions = [r.get("instances") for r in per_rank]
    assert all(d == decisions[0] for d in decisions), f"{impl}: the ranks' backends decided differently: {decisions}"
    peaks = [r["peak_mib"] for r in per_rank]
    row = {"impl": impl, "ms": max(r["ms"] for r in per_rank), "peak_mib": None if None in peaks else max(peaks),
           "loss": round(losses[0], 5), "first_step_s": max(r["first_step_s"] for r in per_rank),
           "ms_per_rank": [r["ms"] for r in per_rank], "peak_mib_per_rank": peaks}
    if decisions[0] is not None:
        row["instances"] = decisions[0]
    return row


def render_md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# {meta['pattern']} benchmark ({meta['case']}, {meta['world_size']} ranks)", "",
             f"- device: {meta['device']}", f"- torch {meta['torch']}, triton {meta['triton']}, date {meta['date']}",
             f"- command: `{meta['command']}`", "",
             "| impl | ms/step per GPU (slowest rank) | tokens/s, all GPUs | peak MiB above weights per GPU | "
             "first step s | loss | instances |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error'][:120]} | | | | | |")
            continue
        inst = ", ".join(f"{k} {v}" for k, v in r.get("instances", {}).items())
        lines.append(f"| {r['impl']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']} | "
                     f"{r['first_step_s']} | {r['loss']:.4f} | {inst} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = step_parser(__doc__.splitlines()[0], IMPLS, "eager,inductor,autokernel",
                    "tiny config on the CPU over gloo: tests the plumbing only")
    p.add_argument("--wrap", choices=WRAPS, required=True, help="DistributedDataParallel or FSDP2's fully_shard")
    args = parse_step_args(p, argv, IMPLS)
    if "RANK" not in os.environ:
        p.error("launch with torchrun --nproc-per-node N (the environment has no RANK)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("CUDA is not available: run on the device machine, or pass --smoke", file=sys.stderr)
            return 2
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else os.environ.get("AUTOKERNEL_CACHE_DIR")
    dims = SMOKE if args.smoke else FULL
    compile_cold()
    rows, failed = [], False
    for impl in args.impl_list:
        try:
            mine: dict[str, Any] = time_wrapped(impl, args.wrap, dims, args.iters, device, cache_dir)
        except Exception as exc:  # one impl failing must not lose the others' rows
            mine = {"error": f"{type(exc).__name__}: {exc}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, mine)
        errors = [f"rank {i}: {r['error']}" for i, r in enumerate(per_rank) if "error" in r]
        if errors:
            row = {"impl": impl, "error": "; ".join(errors)}
        else:
            try:
                row = merge_ranks(impl, per_rank)
            except AssertionError as exc:
                row, failed = {"impl": impl, "error": str(exc)}, True
            else:
                row["tokens_per_s"] = round(world * dims["batch"] * dims["seq"] / row["ms"] * 1e3)
        row = {"pattern": f"llama-step-{args.wrap}", "case": case_name(dims), "world_size": world,
               "dtype": "bf16" if device.type == "cuda" else "fp32", "pass": "fwd+bwd", **row}
        if rank == 0:
            print(json.dumps(row), flush=True)
        rows.append(row)
    if rank == 0:
        out = results_dir(args.out, args.smoke, "bench_ddp_")
        launch = ["torchrun", "--nproc-per-node", str(world), "benchmarks/bench_ddp.py"]
        meta = {**describe_run(device, dims, launch, argv),
                "pattern": f"llama-step-{args.wrap}", "world_size": world}
        name = f"llama-step-{args.wrap}"
        (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        md = render_md(meta, rows)
        (out / f"{name}.md").write_text(md)
        print(md)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    # Leave without finalizing the interpreter. Under --wrap fsdp2 the gloo group outlives
    # destroy_process_group() (the device mesh still holds it), and its worker threads ran into the
    # interpreter's shutdown; the likely cause (not proven) of a rare abort of one rank there, std::terminate
    # ("terminate called without an active exception"), is one of them releasing the last collective's tensors
    # and needing the GIL from a finalizing interpreter. A barrier before the teardown did not stop it (CI saw it
    # again). Everything is written and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
