"""``ak-tune --model FILE.py:FACTORY``: tune what matters for one whole model, in Amdahl's order.

The factory returns ``(model, inputs)`` (``inputs`` a dict of keyword arguments or a tuple). One
training step runs under ``backend="autokernel"`` (its misses land in the wanted table) and is timed;
each distinct wanted request of the model is timed as Inductor runs it and given its DRAM floor;
the table ranks them by the step time they could save (count x (now - floor)), and they are tuned
in that order within the budget (on several GPUs, taken in that order from one queue). The step is
timed again at the end.

This module drives models only through public API (``torch.compile``, ``autokernel.explain``) and
the tuner; it knows nothing of FX.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autokernel.cache import KernelCache
from autokernel.playbook.pool import Job, Shard, tune_all
from autokernel.playbook.tuner import TuneRequest, TuneResult, Worker, WorkerFailure, measure_baseline


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


def step_ms(compiled: Any, model: Any, inputs: Any, repeats: int = 5) -> float:
    """Median wall time of one training step (forward, loss, backward), after one warm-up step."""
    def step():
        _loss(_call(compiled, inputs)).backward()
        for p in model.parameters():
            p.grad = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Ranked:
    request: TuneRequest
    count: int
    now_ms: float | None  # forward + backward as Inductor runs it
    floor_ms: float | None
    baseline: tuple[dict[str, float | None], dict[str, float | None]] | None = None  # for tune(): not re-measured

    @property
    def gain_ms(self) -> float | None:
        if self.now_ms is None:
            return None
        return self.count * (self.now_ms - (self.floor_ms or 0.0))


def rank(requests: list[tuple[TuneRequest, int]], device: torch.device, timeout_s: float) -> list[Ranked]:
    """Time each request as Inductor runs it and give its floor; most step time to gain first."""
    from autokernel.lowering import families

    ranked = []
    for request, count in requests:
        worker = Worker(request, device, 64 if device.type == "cpu" else None, timeout_s)
        now = floor = baseline = None
        try:
            problem = families()[request.pattern].problem(request.flags, request.dtype, request.shape, device)
            floors, peer, detail = measure_baseline(worker, problem)
            now, floor = peer["train_ms"], floors["train"]
            baseline = None if detail else (floors, peer)
        except WorkerFailure:
            pass
        finally:
            worker.stop()
        ranked.append(Ranked(request, count, now, floor, baseline))
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
               list_only: bool = False, **tune_kwargs: Any) -> list[TuneResult]:
    """Rank and tune the misses of ``factory()``'s model (see the module's docstring) on ``devices`` (ranked
    on the first). ``shard``: only the misses this host's share owns. ``list_only``: print them after the
    first timing of the step (which records them) and tune nothing."""
    import autokernel

    t0 = time.time()
    model, inputs = factory()
    options = {"autokernel.cache_dir": str(cache.root)}
    torch._dynamo.reset()
    before = step_ms(torch.compile(model, backend="autokernel", options=options), model, inputs)
    report = (autokernel.explain(model, **inputs, options=options) if isinstance(inputs, dict)
              else autokernel.explain(model, *inputs, options=options))
    counts: dict[tuple, int] = {}
    for inst in report.instances:
        if inst.status == "miss" and all(isinstance(d, int) for d in inst.shape):
            identity = TuneRequest(inst.pattern, inst.flags, inst.dtype, list(inst.shape)).identity()
            counts[identity] = counts.get(identity, 0) + 1
    # This model's misses only (the wanted table may hold other models' too), as the wanted table has them.
    wanted_key = {}
    requests = []
    for key, w in cache.wanted():
        request = TuneRequest(w["pattern"], w["flags"], w["dtype"], w["shape"])
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
    ranked = rank(requests, devices[0], timeout_s)
    gain = sum(r.gain_ms or 0.0 for r in ranked)
    out(f"step {before:.2f} ms; {len(report.instances)} pattern instance(s), {len(ranked)} to tune{share}; "
        f"at the floor the step would take about {max(before - gain, 0):.2f} ms (Amdahl)")
    out(table(ranked, before))
    jobs = [Job(r.request, wanted_key[r.request.identity()], r.baseline) for r in ranked]
    results = tune_all(jobs, cache, devices, t0 + budget_s, timeout_s, out=out, **tune_kwargs)
    torch._dynamo.reset()
    after = step_ms(torch.compile(model, backend="autokernel", options=options), model, inputs)
    note = " (Triton interpreter on CPU: these times mean nothing)" if devices[0].type == "cpu" else ""
    out(f"step before tuning {before:.2f} ms, after {after:.2f} ms "
        f"(expected at the floor: {max(before - gain, 0):.2f} ms){note}")
    sys.stdout.flush()
    return results
