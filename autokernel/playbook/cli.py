"""``ak-tune``: fill the cache for this GPU.

    ak-tune                                   # every miss in the wanted table, most-seen first
    ak-tune --pattern rms_norm --shape 8192x4096 --dtype bf16 [--flags mode=gemma,offset=1] [--forward-only]
    ak-tune --model file.py:factory [--inference [--decode-batches 1,8,64,256]]   # one model's misses
    ak-tune --list                            # show the wanted table and exit
    ak-tune --shard 2/4 --gpus all            # host 2 of 4: its share of the wanted table, on every GPU here
    ak-tune --notes [--pattern rms_norm [--shape 8192x4096]]   # what earlier runs learned on this GPU
    ak-tune --playbook [--pattern rms_norm]   # the playbook's rules (and what was measured, on which GPU)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from autokernel.cache.cli import positive
from autokernel.playbook.model import DECODE_BATCHES
from autokernel.playbook.pool import Job, Shard, tune_all
from autokernel.playbook.tuner import STRATEGIES, TuneRequest, TuneResult, set_interpreter_if_no_gpu


def _shape(text: str) -> list[int]:
    try:
        dims = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must look like 8192x4096, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--shape sizes must be positive, got {text!r}")
    return dims


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--decode-batches must look like 1,8,64, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"--decode-batches sizes must be positive, got {text!r}")
    return sizes


def _flags(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--flags items look like key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v) if k.strip() == "offset" else v.strip()
        except ValueError:
            raise argparse.ArgumentTypeError(f"--flags {k}= must be a number, got {v!r}") from None
    return out


def _price(text: str) -> tuple[float, float]:
    try:
        rates = tuple(float(v) for v in text.split(","))
    except ValueError:
        rates = ()
    if len(rates) != 2 or min(rates) < 0:
        raise argparse.ArgumentTypeError(f"--agent-price looks like IN,OUT (USD per million input and output "
                                         f"tokens, e.g. 3,15), got {text!r}")
    return rates


def _compilers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes (0 or more), got {text!r}")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ak-tune", description="Tune kernels for the cache misses of this GPU.")
    p.add_argument("--model", help="tune one model's misses in Amdahl order: path/to/file.py:factory, where "
                                   "factory() returns (model, inputs); by default one training step runs (forward "
                                   "with the inputs, loss, backward)")
    p.add_argument("--hf-config", help="like --model, for the causal LM a local transformers config.json "
                                       "describes (random weights)")
    p.add_argument("--batch", type=positive(int, "sequences"), default=1,
                   help="--hf-config: batch size (default 1)")
    p.add_argument("--seq", type=positive(int, "tokens"), default=512,
                   help="--hf-config: sequence length (default 512)")
    p.add_argument("--inference", action="store_true",
                   help="--model/--hf-config: tune for inference instead of training. The model must be a "
                        "transformers causal LM and the inputs a dict with input_ids [batch, seq]: under "
                        "torch.inference_mode, each into a static KV cache of seq positions, it runs the prefill "
                        "(input_ids as given; other inputs such as labels are not used) and one decode step (one "
                        "token per sequence) at each --decode-batches size; their misses are tuned forward-only "
                        "(an entry for the forward alone: training compiles still miss it)")
    p.add_argument("--decode-batches", type=_batches,
                   help="--inference: batch sizes of the decode steps, e.g. 1,8,64,256 (the default); a decode step "
                        "has one row per sequence, and the cache buckets rows by powers of two")
    p.add_argument("--pattern", help="tune one pattern instance instead of the wanted table (e.g. rms_norm)")
    p.add_argument("--shape", type=_shape, help="input shape, e.g. 8192x4096 (rows x hidden); linear_cross_entropy: "
                                                "8192x4096x128256 (tokens x hidden x vocab)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--flags", type=_flags, default={}, help="variant flags, e.g. mode=gemma,offset=1")
    p.add_argument("--forward-only", action="store_true",
                   help="--pattern: tune the forward pass alone (inference); the entry serves no backward")
    p.add_argument("--budget", type=positive(float, "minutes"), default=30.0,
                   help="minutes of tuning (default 30); a shape once started still gets one checked "
                        "forward and backward candidate past it (forward-only: one forward candidate). "
                        "--model/--hf-config: counted from the end of the ranking, which comes first, as does "
                        "the timing of the model after")
    p.add_argument("--timeout", type=positive(float, "seconds"), default=180.0,
                   help="seconds before a candidate counts as hung")
    p.add_argument("--precompile", type=_compilers, metavar="N",
                   help="compiler processes per GPU that build the next candidates' kernels while one is checked "
                        "and timed (default: a quarter of the cores, at most 4; 0: none; CUDA only)")
    p.add_argument("--strategy", choices=STRATEGIES, default="search",
                   help="search: the playbook's kernel space; agent: an LLM writes kernels (ANTHROPIC_API_KEY, "
                        "pip install 'autokernel[agent]'); both: search for half the budget, then the agent tries "
                        "to beat it")
    p.add_argument("--agent-model", default=None, help="Anthropic model for the agent")
    p.add_argument("--max-turns", type=positive(int, "agent replies"), default=20,
                   help="agent replies per shape (default 20)")
    p.add_argument("--agent-price", type=_price, metavar="IN,OUT",
                   help="USD per million input and output tokens, for the agent's cost in the log (default: the "
                        "list prices of the models it knows)")
    p.add_argument("--gpus", help="tune on these GPUs at once, e.g. 0,1, or all visible ones: all (one worker each, "
                                  "one shared queue); without CUDA (the interpreter) 0,1 means two CPU workers and "
                                  "all means one")
    p.add_argument("--shard", type=_shard, metavar="K/N",
                   help="tune only share K of N (counted from 1: 1/2 and 2/2) of the wanted table or of --model's "
                        "misses, for N hosts tuning at once without a coordinator; a request's share comes from a "
                        "hash of its pattern, flags, dtype and shape bucket, so hosts with the same table split "
                        "it the same way")
    p.add_argument("--cache-dir", help="cache root (default $AUTOKERNEL_CACHE_DIR or ~/.cache/autokernel)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run candidates the notes say failed on the same shape before (skipped otherwise)")
    p.add_argument("--list", action="store_true",
                   help="print the wanted table (with --model: the model's misses; with --shard: this share) and exit")
    p.add_argument("--notes", action="store_true",
                   help="print what earlier runs learned on this GPU (winners, failed candidates) and exit; "
                        "--pattern and --shape narrow it down")
    p.add_argument("--playbook", action="store_true",
                   help="print the playbook's rules (for --pattern, the ones that apply) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


class _Progress:
    """One progress line on stderr (rewritten in place on a terminal), ended before any other output."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.open = False  # a progress line is on the terminal without its newline

    def __call__(self, prefix: str, msg: str) -> None:
        if self.quiet:
            return
        line = f"[ak-tune] {prefix}: {msg}"
        sys.stderr.write(("\r\033[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()
        self.open = self.tty

    def done(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            self.open = False

    def print(self, line: str) -> None:
        self.done()
        print(line, flush=True)


def _summary(results: list[TuneResult]) -> str:
    # "in context": the decisive pass served through torch.compile, ours/Inductor's (the race that decides, and
    # why a kernel faster alone can still read "inductor wins"), with both peaks where measured (linear + CE is
    # served slower within its slack at half the memory); "failed" where that race gave no time for ours.
    head = ["pattern", "shape", "dtype", "status", "ours", "fwd ms", "train ms", "Inductor fwd", "Inductor train",
            "in context", "floor train", "% of floor", "cands", "s"]
    rows = []
    for r in results:
        t = r.times
        last = r.request.passes[-1]  # the pass the kernel was chosen on
        pct = (f"{100 * t[f'floor_{last}_ms'] / t[f'{last}_ms']:.0f}% {last}"
               if t.get(f"floor_{last}_ms") and t.get(f"{last}_ms") else "")

        def f(key: str, t=t) -> str:
            return f"{t[key]:.4f}" if t.get(key) is not None else "-"

        if "in_context_clock" not in t:  # not raced in context
            context = "-"
        elif t.get(f"in_context_{last}_ms") is None:
            context = "failed"
        else:
            context = f"{f(f'in_context_{last}_ms')}/{f(f'in_context_inductor_{last}_ms')}"
            peaks = t.get(f"in_context_{last}_peak_mib"), t.get(f"in_context_inductor_{last}_peak_mib")
            if None not in peaks:  # on CUDA: what a pattern that trades time for memory was weighed on
                context += f" ({peaks[0]:.0f}/{peaks[1]:.0f} MiB)"

        rows.append([r.request.pattern, "x".join(map(str, r.request.shape)), r.request.dtype, r.status,
                     ",".join(r.served) or "-", f("fwd_ms"), f("train_ms"), f("inductor_fwd_ms"),
                     f("inductor_train_ms"), context, f("floor_train_ms"), pct, str(r.candidates), f"{r.seconds:.0f}"])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _print_notes(args: argparse.Namespace) -> int:
    """``ak-tune --notes``: the notes of this GPU's cache namespace, oldest run first."""
    from autokernel.cache import KernelCache, row_bucket
    from autokernel.cache.fingerprint import default_device
    from autokernel.playbook.notes import NotesStore, render

    cache = KernelCache(args.cache_dir, device=default_device())
    records = NotesStore(cache.notes_path).records()
    if args.pattern:
        records = [r for r in records if r["pattern"] == args.pattern]
    if args.shape:
        rows = 1
        for d in args.shape[:-1]:
            rows *= d
        records = [r for r in records if (r["hidden"], r["row_bucket"]) == (args.shape[-1], row_bucket(rows))]
    print(f"notes in {cache.notes_path}: {len(records)} run(s)" + (":" if records else ""))
    if records:
        print(render(records))
    return 0


def _devices(spec: str | None, device: torch.device, parser: argparse.ArgumentParser) -> list[torch.device]:
    """The devices ``--gpus`` names: ``0,1`` or ``all`` (every visible CUDA device). Without CUDA they are
    CPU workers running the interpreter, whose tuning exercises the loop rather than finds speed: ``0,1``
    asks for two, and ``all`` gets one (there are no GPUs to count)."""
    if not spec:
        return [device]
    if spec == "all":
        if device.type != "cuda":
            print("--gpus all: no CUDA device here; tuning with one CPU worker (the Triton interpreter)",
                  file=sys.stderr)
            return [device]
        return [torch.device("cuda", g) for g in range(torch.cuda.device_count())]
    try:
        ids = [int(g) for g in spec.split(",")]
    except ValueError:
        parser.error(f"--gpus takes device numbers like 0,1 or all, got {spec!r}")
    if device.type != "cuda":
        return [device] * len(ids)
    bad = [g for g in ids if not 0 <= g < torch.cuda.device_count()]
    if bad:
        parser.error(f"--gpus: no CUDA device {bad} (this machine has {torch.cuda.device_count()})")
    return [torch.device("cuda", g) for g in ids]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s %(levelname)s] %(message)s")
    if args.playbook:
        from autokernel.playbook.rules import render

        print(render(args.pattern))
        return 0
    if args.notes:
        return _print_notes(args)
    if args.pattern and not args.shape:
        parser.error("--pattern needs --shape")
    if args.model and args.hf_config:
        parser.error("--model and --hf-config each name the model: pass one")
    if args.shape and not args.pattern:
        parser.error("--shape goes with --pattern")
    if args.inference and not (args.model or args.hf_config):
        parser.error("--inference goes with --model or --hf-config")
    if args.decode_batches and not args.inference:
        parser.error("--decode-batches goes with --inference")
    if args.forward_only and not args.pattern:
        parser.error("--forward-only goes with --pattern (a wanted request knows whether it needs a backward)")
    if args.strategy != "search" and not os.environ.get("ANTHROPIC_API_KEY"):
        print(f"--strategy {args.strategy}: ANTHROPIC_API_KEY is not set; the agent phase will be skipped "
              "(the search still runs for --strategy both)", file=sys.stderr)
    device = set_interpreter_if_no_gpu()
    devices = _devices(args.gpus, device, parser)
    from autokernel.cache import KernelCache

    cache = KernelCache(args.cache_dir, device=device)
    progress = _Progress(args.quiet or len(devices) > 1)
    tune_kwargs = dict(progress=progress, strategy=args.strategy, agent_model=args.agent_model,
                       max_turns=args.max_turns, agent_price=args.agent_price, retry_failed=args.retry_failed,
                       precompile=args.precompile)
    if args.model or args.hf_config:
        from autokernel.playbook.model import ModelError, hf_factory, load_factory, tune_model

        try:
            factory = load_factory(args.model) if args.model else hf_factory(args.hf_config, args.batch, args.seq)
            results = tune_model(factory, cache, devices, args.budget * 60, args.timeout, out=progress.print,
                                 shard=args.shard, list_only=args.list,
                                 decode_batches=(args.decode_batches or DECODE_BATCHES) if args.inference else None,
                                 **tune_kwargs)
        except ModelError as exc:
            print(f"ak-tune: {exc}", file=sys.stderr)
            return 2
        if args.list:
            return 0
        progress.done()
        print(_summary(results))
        return 0 if all(r.status in ("written", "inductor wins") for r in results) else 1
    if args.pattern:
        from autokernel.lowering import families

        if args.pattern not in families():
            parser.error(f"--pattern must be one of {sorted(families())}, got {args.pattern!r}")
        work = [Job(TuneRequest(args.pattern, args.flags, args.dtype, args.shape, args.forward_only))]
    else:
        work = [Job(TuneRequest.from_wanted(w), key) for key, w in cache.wanted()]
    wanted_count = len(work)
    share = ""
    if args.shard is not None:
        work = [job for job in work if args.shard.owns(job.request)]
        share = f" (shard {args.shard}: {len(work)} of {wanted_count})"
    if args.list:
        print(f"wanted in {cache.path}{share}:")
        for job in work:
            print(f"  {job.request.label()}")
        return 0
    if not work:
        print(f"nothing to tune{share}: " + (f"the other shares own all that {cache.path} wants" if wanted_count
                                             else f"the wanted table of {cache.path} is empty (compile a model "
                                                  "with backend='autokernel' first, or pass --pattern/--shape)"))
        return 0
    results = tune_all(work, cache, devices, time.time() + args.budget * 60, args.timeout, out=progress.print,
                       **tune_kwargs)
    progress.done()
    print(_summary(results))
    print(f"cache: {cache.path}")
    cache.close()
    return 0 if all(r.status in ("written", "inductor wins") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
