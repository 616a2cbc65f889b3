"""``ak-tune --model FILE.py:FACTORY``: tune what matters for one whole model, in Amdahl's order.

The factory returns ``(model, inputs)`` (``inputs`` a dict of keyword arguments or a tuple). What runs
(the workloads) is one training step by default: forward with the inputs, loss, backward. With
``--inference`` (``decode_batches``) the model must be a transformers causal LM and the inputs a dict
with ``input_ids`` [batch, seq]: under ``torch.inference_mode``, each with a static KV cache of ``seq``
positions, the prefill of ``input_ids`` and one decode step (one token per sequence) at each decode batch
size (:func:`inference_workloads`); no instance needs a backward, so their misses are recorded, and
tuned, forward-only.

Each workload runs under ``backend="autokernel"`` (its misses land in the wanted table) and is timed;
each distinct wanted request of the model is timed as Inductor runs it (the passes it tunes) and given
its DRAM floor; the table ranks them by the time they could save over the workloads (count x (now -
floor)), and they are tuned in that order, each for a share of the budget in proportion to that time
(:func:`~autokernel.playbook.pool.budget_share`; on several GPUs, taken in that order from one
queue). The workloads are timed again at the end.
Under the Triton interpreter (no GPU) nothing is timed against Inductor: the table keeps the wanted
table's order.

This module drives models only through public API (``torch.compile``, ``autokernel.explain``) and
the tuner; it knows nothing of FX.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autokernel.cache import KernelCache
from autokernel.cache.fingerprint import interpreter_enabled
from autokernel.playbook.pool import Job, Shard, tune_all
from autokernel.playbook.tuner import TuneRequest, TuneResult, Worker, WorkerFailure, measure_baseline

DECODE_BATCHES = (1, 8, 64, 256)  # --inference: the decode steps' batch sizes (rows), one per row bucket to tune


class ModelError(Exception):
    """The --model argument could not be loaded; the message says why."""


def load_factory(spec: str) -> Callable[[], tuple[Any, Any]]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ModelError(f"--model must look like path/to/file.py:factory, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"--model: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"autokernel_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        import traceback

        raise ModelError(f"--model: importing {file} failed:\n{traceback.format_exc()}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"--model: {file} has no function {name!r}")
    return factory


def hf_factory(config_path: str, batch: int, seq: int) -> Callable[[], tuple[Any, Any]]:
    """A factory for ``--hf-config``: the causal LM a local ``config.json`` describes, random weights, random
    token ids as inputs and labels (nothing is downloaded)."""
    def make() -> tuple[Any, Any]:
        try:
            import transformers
        except ImportError:
            raise ModelError("--hf-config needs transformers (pip install transformers)") from None
        path = Path(config_path)
        if not path.is_file():
            raise ModelError(f"--hf-config: no file {path}")
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except Exception as exc:
            raise ModelError(f"--hf-config: {path} is not a transformers config: {exc}") from None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16)
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        return model, {"input_ids": ids, "labels": ids}

    return make


def _call(model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None:
        loss = out[0] if isinstance(out, (tuple, list)) else out
        loss = loss.float().square().mean()
    return loss


@dataclass
class Workload:
    """One call of the model that tune_model compiles, times and explains: a training step (forward, loss,
    backward), or one forward under ``torch.inference_mode`` (a prefill or a decode step)."""

    name: str
    inputs: Any
    train: bool = True
    rewind: Callable[[], None] = lambda: None  # inference: before each forward, empties the KV cache it writes

    def run(self, fn: Any, model: Any) -> None:
        if self.train:
            _loss(_call(fn, self.inputs)).backward()
            for p in model.parameters():
                p.grad = None
            return
        with torch.inference_mode():  # the cache's tensors are inference tensors: rewound in there too
            self.rewind()
            _call(fn, self.inputs)

    def time_ms(self, compiled: Any, model: Any, repeats: int = 5) -> float:
        """Median wall time of one call, after one warm-up call (the one that compiles)."""
        def once():
            self.run(compiled, model)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        once()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def explain(self, model: Any, options: dict[str, Any] | None) -> Any:
        """``autokernel.explain`` of one call: its pattern instances (a training step's forward suffices)."""
        import autokernel

        args, kwargs = (((), self.inputs) if isinstance(self.inputs, dict) else (self.inputs, {}))
        if self.train:
            return autokernel.explain(model, *args, options=options, **kwargs)
        with torch.inference_mode():
            self.rewind()
            return autokernel.explain(model, *args, options=options, **kwargs)


def cache_argument(model: Any) -> str:
    """The keyword a transformers causal LM takes its KV cache by: ``cache`` (transformers 5.25, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (5.17 and earlier); ModelError for a model that is
    not one."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    if getattr(model, "config", None) is None or name not in params:
        raise ModelError("--inference: the model must be a transformers causal LM (a config, and a KV cache "
                         f"argument in its forward; {type(model).__name__} lacks one)")
    return name


def inference_workloads(model: Any, inputs: Any, decode_batches: Sequence[int]) -> list[Workload]:
    """``--inference``: the prefill of ``inputs["input_ids"]`` ([batch, seq]; other inputs, such as labels, are
    not used) and one decode step of one token per sequence at each of ``decode_batches``, each writing a static
    KV cache of ``seq`` positions of its own (rewound before every forward: its shapes, the ones compiled and
    tuned, are those of any decode position)."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ModelError("--inference: the factory's inputs must be a dict with input_ids of shape [batch, seq] "
                         "(the prefill batch)")
    try:
        from transformers import StaticCache
    except ImportError:
        raise ModelError("--inference needs transformers (pip install transformers)") from None
    cache_arg = cache_argument(model)
    params = inspect.signature(model.forward).parameters
    model.eval()
    batch, seq = ids.shape

    def cached_forward(name: str, tokens: torch.Tensor) -> Workload:
        cache = StaticCache(config=model.config, max_cache_len=seq)
        kwargs = {"input_ids": tokens, cache_arg: cache, "use_cache": True}
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1  # as generate() does: the next token's logits only
        with torch.inference_mode():
            # Eagerly, once: the cache allocates its tensors (and marks them static for CUDA graphs) outside any
            # compiled graph, as transformers requires.
            model(**kwargs)
        return Workload(name, kwargs, train=False, rewind=cache.reset)

    workloads = [cached_forward(f"prefill {batch}x{seq}", ids)]
    for size in decode_batches:
        tokens = ids[:, -1:].repeat(-(-size // batch), 1)[:size]  # the prompts' last tokens, repeated to the batch
        workloads.append(cached_forward(f"decode step at batch {size}", tokens))
    return workloads


@dataclass
class Ranked:
    request: TuneRequest
    count: int
    now_ms: float | None  # the request's passes as Inductor runs them: forward + backward, or the forward alone
    floor_ms: float | None
    baseline: tuple[dict[str, float | None], dict[str, float | None]] | None = None  # for tune(): not re-measured

    @property
    def gain_ms(self) -> float | None:
        if self.now_ms is None:
            return None
        return self.count * (self.now_ms - (self.floor_ms or 0.0))


def rank(requests: list[tuple[TuneRequest, int]], device: torch.device, timeout_s: float,
         say: Callable[[str], None] = lambda _msg: None, seconds: dict[str, float] | None = None) -> list[Ranked]:
    """Time each request as Inductor runs it and give its floor; most time to gain first. Under the Triton
    interpreter nothing is timed (its times mean nothing; tune() does not race there either). ``say`` hears
    which request is being timed (each takes Inductor's compiles: ~20 s a request on an H100 with a child
    process each, as this ran until 2026-12-06; one child now serves them all). ``seconds``, when given,
    receives the worker's time over all requests for Inductor's first runs (``"smoke"``: its compiles) and for
    their timing (``"timing"``)."""
    from autokernel.lowering import families

    if device.type == "cpu" and interpreter_enabled():
        return [Ranked(request, count, None, None) for request, count in requests]
    ranked = []
    worker: Worker | None = None  # one child process for every request (restarted only if one kills it)
    rates: dict[str, Any] = {}  # the device's copy bandwidth (and matmul rate): measured once
    spent = {"smoke": 0.0, "timing": 0.0}
    try:
        for i, (request, count) in enumerate(requests, 1):
            say(f"{i}/{len(requests)} {request.label()}: Inductor's time and the floor")
            if worker is None:
                worker = Worker(request, device, None, timeout_s)
            worker.retarget(request, None)
            now = floor = baseline = None
            try:
                problem = families()[request.pattern].problem(request.flags, request.dtype, request.shape, device)
                if rates.get("status") != "ok" or (hasattr(problem, "flops") and rates.get("matmul_tflops") is None):
                    rates = worker.call("bandwidth")  # again after a failed measurement: a failure is not kept
                split: dict[str, float] = {}
                floors, peer, detail = measure_baseline(worker, problem, rates, split)
                for part in spent:
                    spent[part] += split.get(part, 0.0)
                timed = request.passes[-1]  # forward + backward ("train"), or the forward of a forward-only request
                now, floor = peer[f"{timed}_ms"], floors[timed]
                baseline = None if detail else (floors, peer)
            except WorkerFailure:
                pass
            ranked.append(Ranked(request, count, now, floor, baseline))
    finally:
        if worker is not None:
            worker.stop()
        if seconds is not None:
            seconds.update(spent)
    return sorted(ranked, key=lambda r: -(r.gain_ms if r.gain_ms is not None else -1.0))


def table(ranked: list[Ranked], step: float) -> str:
    head = f"{'#':>2}  {'pattern instance':58s} {'count':>5} {'now ms':>9} {'floor ms':>9} {'share':>6} {'gain ms':>9}"
    lines = [head]
    for i, r in enumerate(ranked, 1):
        share = f"{100 * r.count * r.now_ms / step:5.1f}%" if r.now_ms else "    -"
        lines.append(f"{i:>2}  {r.request.label()[:58]:58s} {r.count:>5} "
                     + (f"{r.now_ms:9.4f}" if r.now_ms is not None else f"{'-':>9}")
                     + (f" {r.floor_ms:9.4f}" if r.floor_ms is not None else f" {'-':>9}")
                     + f" {share:>6} " + (f"{r.gain_ms:9.4f}" if r.gain_ms is not None else f"{'-':>9}"))
    return "\n".join(lines)


def tune_model(factory: Callable[[], tuple[Any, Any]], cache: KernelCache, devices: list[torch.device],
               budget_s: float, timeout_s: float, out: Callable[[str], None] = print, shard: Shard | None = None,
               list_only: bool = False, decode_batches: Sequence[int] | None = None,
               **tune_kwargs: Any) -> list[TuneResult]:
    """Rank and tune the misses of ``factory()``'s model (see the module's docstring) on ``devices`` (ranked on
    the first): of one training step, or with ``decode_batches`` of its inference (prefill and decode steps at
    those batch sizes). ``shard``: only the misses this host's share owns. ``list_only``: print them after the
    first timing (which records them) and tune nothing."""
    t0 = time.time()
    progress = tune_kwargs.get("progress")

    def say(prefix: str, msg: str) -> None:
        if progress is not None:
            progress(prefix, msg)

    model, inputs = factory()
    if decode_batches is None:
        workloads, what = [Workload("training step", inputs)], "step"
    else:
        workloads = inference_workloads(model, inputs, decode_batches)
        what = "inference (" + ", ".join(w.name for w in workloads) + ")"
    options = {"autokernel.cache_dir": str(cache.root)}
    say("model", f"compiling and timing the {what} under backend='autokernel'")
    before, instances = _run_workloads(model, workloads, options, explain=True)
    counts: dict[tuple, int] = {}
    for inst in instances:
        # Every instance, not only misses: one served by another row bucket's entry (a decode step by the
        # prefill's kernel) is in the wanted table too, and worth its own kernel.
        if all(isinstance(d, int) for d in inst.shape):
            identity = TuneRequest(inst.pattern, inst.flags, inst.dtype, list(inst.shape)).identity()
            counts[identity] = counts.get(identity, 0) + 1
    # This model's wanted requests only (the table may hold other models' too), as the wanted table has them.
    wanted_key = {}
    requests = []
    for key, w in cache.wanted():
        request = TuneRequest.from_wanted(w)
        if request.identity() in counts:
            wanted_key[request.identity()] = key
            requests.append((request, counts[request.identity()]))
    share = ""
    if shard is not None:
        mine = [(request, count) for request, count in requests if shard.owns(request)]
        share = f" (shard {shard}: {len(mine)} of the model's {len(requests)})"
        requests = mine
    if list_only:
        out(f"wanted by the model in {cache.path}{share}:")
        for request, count in requests:
            out(f"  {request.label()}  x{count}")
        return []
    rank_t0 = time.time()
    spent: dict[str, float] = {}
    ranked = rank(requests, devices[0], timeout_s, say=lambda msg: say("ranking", msg), seconds=spent)
    rank_s = time.time() - rank_t0
    gain = sum(r.gain_ms or 0.0 for r in ranked)
    out(f"{what} {before:.2f} ms; {len(instances)} pattern instance(s), {len(ranked)} to tune{share}; "
        f"at the floor it would take about {max(before - gain, 0):.2f} ms (Amdahl)")
    out(table(ranked, before))
    # The budget is tuning time. Ranking (a compile and timing per workload, an Inductor baseline per request)
    # used up a whole 3-minute budget for a 4-layer Llama step on an H200, and nothing was tuned.
    out(f"ranked in {time.time() - t0:.0f} s: the {what} under the backend {rank_t0 - t0:.0f} s, "
        f"{len(ranked)} requests {rank_s:.0f} s (Inductor's compiles and first runs {spent.get('smoke', 0):.0f} s, "
        f"its timing {spent.get('timing', 0):.0f} s, the rest worker starts and floors); "
        f"tuning for {budget_s / 60:g} min")
    # Time goes where Amdahl says it pays: linear + CE could save 2.1 of a Llama step's 2.9 ms, SwiGLU nothing.
    jobs = [Job(r.request, wanted_key[r.request.identity()], r.baseline, weight=r.gain_ms) for r in ranked]
    results = tune_all(jobs, cache, devices, time.time() + budget_s, timeout_s, out=out, **tune_kwargs)
    after, _ = _run_workloads(model, workloads, options, explain=False)
    note = " (Triton interpreter on CPU: these times mean nothing)" if devices[0].type == "cpu" else ""
    out(f"{what} before tuning {before:.2f} ms, after {after:.2f} ms "
        f"(expected at the floor: {max(before - gain, 0):.2f} ms){note}")
    sys.stdout.flush()
    return results


def _run_workloads(model: Any, workloads: list[Workload], options: dict[str, Any],
                   explain: bool) -> tuple[float, list[Any]]:
    """Compile each workload afresh under ``backend="autokernel"`` (recording its misses) and time it; the summed
    time and, with ``explain``, every workload's pattern instances."""
    total, instances = 0.0, []
    for w in workloads:
        torch._dynamo.reset()  # one graph per workload, each compiled for its own shapes
        total += w.time_ms(torch.compile(model, backend="autokernel", options=options), model)
        if explain:
            torch._dynamo.reset()  # explain must trace the model, not reuse the compiled frames
            instances += w.explain(model, options).instances
    torch._dynamo.reset()
    # The blocks the caching allocator kept from these steps go back to the device: the tuning children that
    # follow share the GPU with this process, and a linear + cross-entropy's checks need tens of GiB.
    release_cached_memory()
    return total, instances


def release_cached_memory() -> None:
    """Free the CUDA caching allocator's unused blocks (the garbage holding them first); nothing off CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
