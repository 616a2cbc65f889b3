"""Launch sweeps of the RMSNorm and LayerNorm kernels, called directly (GPU; diagnostics, not a benchmark).

python benchmarks/sweep_norm.py [--pattern rms_norm|layer_norm] [--shape 8192x4096] [--pass bwd|fwd|both]
Times each kernel alone on the GPU clock (CUDA-graph replay, L2 flushed between replays) for a grid of launch
configs: the backward over warps x programs per SM (its partial-gradient sum included) for each backward
kernel (``--bwd-kernels``: ``single`` holds the row whole, ``chunk:N`` reads it in chunks of N, ``split:N`` is
RMSNorm's split backward with column blocks of N; by default ``single`` below 16K columns, the chunked and
split ones from there), the forward over warps x rows per program (and the forward's chunks from 16K
columns). Inductor's compiled pass is timed beside them, and every row shows its GB/s over the bytes that must
move, so the default's place in the grid (marked ``*``) says whether the heuristic or the kernel is at fault;
the default backward's time is also split among its kernels (the profiler). Off CUDA (``--device cpu`` under
TRITON_INTERPRET=1, a small shape) it only checks that every config runs. ``--json F`` writes the rows;
``--no-inductor`` skips Inductor's rows (no compile). LayerNorm's ``--sum-tiles N:P:W,...`` also times the
default backward with each tile of its partial-gradient reduction (N columns a program, P partial rows a
step, W warps), whole and the reduction kernel alone (default: the tuner's tiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from autokernel.lowering.layer_norm.kernels import LayerNormConfig, layer_norm_bwd, layer_norm_fwd
from autokernel.lowering.layer_norm.kernels import default_config as layer_norm_default
from autokernel.lowering.layer_norm.problem import SUM_TILES
from autokernel.lowering.rms_norm.kernels import RmsNormConfig, rms_norm_bwd, rms_norm_fwd
from autokernel.lowering.rms_norm.kernels import default_config as rms_norm_default
from autokernel.playbook.timing import gpu_or_host_ms

EPS = 1e-5
WARPS = (1, 2, 4, 8, 16)
PROGRAMS_PER_SM = (1, 2, 4, 8, 16, 32)
ROWS_PER_PROGRAM = (1, 2, 4)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """(forward of a config, backward of a config, default config, Inductor's forward) for RMSNorm."""
    del b
    rows, hidden = x.shape
    default = rms_norm_default(hidden, rows, x.dtype)
    _, rstd = rms_norm_fwd(x, w, EPS, 0.0, "llama", x.dtype, default, True)

    def fwd(cfg):
        return rms_norm_fwd(x, w, EPS, 0.0, "llama", x.dtype, cfg, False)

    def bwd(cfg, dy):
        return rms_norm_bwd(dy, x, w, rstd, 0.0, "llama", cfg)

    def eager(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)

    return fwd, bwd, default, RmsNormConfig, eager


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """As :func:`_rms_norm`, for LayerNorm with a weight and a bias."""
    rows, hidden = x.shape
    default = layer_norm_default(hidden, rows, x.dtype)
    _, mean, rstd = layer_norm_fwd(x, w, b, EPS, 1, "fp32", x.dtype, default, True)

    def fwd(cfg):
        return layer_norm_fwd(x, w, b, EPS, 1, "fp32", x.dtype, cfg, False)

    def bwd(cfg, dy):
        return layer_norm_bwd(dy, x, w, b, mean, rstd, 1, "fp32", cfg)

    def eager(x, w, b):
        return F.layer_norm(x, (hidden,), w, b, EPS)

    return fwd, bwd, default, LayerNormConfig, eager


FAMILIES = {"rms_norm": _rms_norm, "layer_norm": _layer_norm}


def _time(fn: Callable[[], object], dev: torch.device) -> tuple[float, str]:
    if dev.type != "cuda":
        fn()  # off CUDA only check that it runs: the interpreter's wall clock says nothing of the GPU
        return float("nan"), "ran"
    return gpu_or_host_ms(fn, dev)


def kernel_split(fn: Callable[[], object], dev: torch.device, iters: int = 20) -> dict[str, float]:
    """GPU ms per call of each kernel ``fn`` launches (the profiler's CUDA time over ``iters`` calls, after a
    warm-up call): where a pass's time goes among its kernels. Empty off CUDA."""
    if dev.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(dev)
    return {e.key: e.device_time_total / 1e3 / iters for e in prof.key_averages() if e.device_time_total > 0}


def default_bwd_kernels(pattern: str, hidden: int) -> list[str]:
    """The backward kernels worth sweeping at this width (see the module's docstring)."""
    if hidden < 16384:
        return ["single"]
    return ([f"split:{n}" for n in (512, 1024, 2048)] if pattern == "rms_norm" else []) + \
        [f"chunk:{n}" for n in (2048, 4096, 8192)]


def _bwd_kernel_knobs(pattern: str, spec: str) -> dict[str, int]:
    """``single``, ``chunk:N`` or ``split:N`` as config fields."""
    kind, _, width = spec.partition(":")
    if kind == "single" and not width:
        return {"block_n": 0}
    if kind == "chunk" and width.isdigit():
        return {"block_n": int(width)}
    if kind == "split" and width.isdigit() and pattern == "rms_norm":
        return {"bwd_split_n": int(width)}
    raise ValueError(f"--bwd-kernels: {spec!r} is not single, chunk:N or (rms_norm) split:N")


def sweep(pattern: str, rows: int, hidden: int, passes: tuple[str, ...], dev: torch.device,
          warps: tuple[int, ...] = WARPS, per_sm_grid: tuple[int, ...] = PROGRAMS_PER_SM,
          rpp_grid: tuple[int, ...] = ROWS_PER_PROGRAM, bwd_kernels: list[str] | None = None,
          with_inductor: bool = True, sum_tiles: tuple[tuple[int, int, int], ...] = ()) -> list[dict]:
    x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, dtype=torch.bfloat16)).requires_grad_()
    b = (0.1 * torch.randn(hidden, device=dev, dtype=torch.bfloat16)).requires_grad_()
    dy = torch.randn_like(x)
    fwd, bwd, default, config_cls, eager = FAMILIES[pattern](x.detach(), w.detach(), b.detach())
    params = (w, b) if pattern == "layer_norm" else (w,)
    size = x.numel() * x.element_size()
    rows_out: list[dict] = []

    def add(pass_name: str, name: str, ms: float, clock: str, bytes_moved: int, is_default: bool = False) -> None:
        rows_out.append({"pass": pass_name, "config": name, "ms": ms, "clock": clock, "default": is_default,
                         "gbps": bytes_moved / (ms * 1e-3) / 1e9 if ms == ms else float("nan")})

    def is_default(cfg, keys: tuple[str, ...]) -> bool:
        return all(getattr(cfg, k) == getattr(default, k) for k in keys if hasattr(default, k))

    if "bwd" in passes:
        for spec in bwd_kernels or default_bwd_kernels(pattern, hidden):
            knobs = _bwd_kernel_knobs(pattern, spec)
            for w_ in warps:
                for per_sm in per_sm_grid:
                    if w_ * per_sm > 64:
                        continue
                    cfg = config_cls(bwd_num_warps=w_, bwd_programs_per_sm=per_sm, **knobs)
                    ms, clock = _time(lambda cfg=cfg: bwd(cfg, dy), dev)
                    mine = is_default(cfg, ("bwd_num_warps", "bwd_programs_per_sm", "block_n", "bwd_split_n"))
                    add("bwd", f"{spec} warps {w_:2d} x {per_sm:2d}/SM", ms, clock, 3 * size, mine)
        for n, p_, w_ in sum_tiles:
            cfg = dataclasses.replace(default, sum_block_n=n, sum_block_p=p_, sum_num_warps=w_)
            name = f"default, sum tile {n}x{p_} warps {w_}"
            ms, clock = _time(lambda cfg=cfg: bwd(cfg, dy), dev)
            mine = (n, p_, w_) == default.sum_tile
            add("bwd", name, ms, clock, 3 * size, mine)
            alone = kernel_split(lambda cfg=cfg: bwd(cfg, dy), dev).get("_layer_norm_sum_partials_kernel")
            if alone is not None:  # on CUDA only
                add("bwd sum", name, alone, "gpu", 0, mine)
        split = kernel_split(lambda: bwd(default, dy), dev)
        rows_out += [{"pass": "bwd kernels", "config": name, "ms": ms, "clock": "gpu", "default": True,
                      "gbps": float("nan")} for name, ms in sorted(split.items(), key=lambda kv: -kv[1])]
        if with_inductor:
            compiled = torch.compile(eager)
            y = compiled(x, *params)
            ms, clock = _time(lambda: torch.autograd.grad(y, (x, *params), dy, retain_graph=True), dev)
            add("bwd", "inductor compiled backward", ms, clock, 3 * size)
    if "fwd" in passes:
        # The forward chunks on its own (fwd_block_n); from 16K columns its chunk widths are swept too.
        chunks = (0, 4096, 8192) if hidden >= 16384 else (0,)
        for chunk in chunks:
            for w_ in warps:
                for rpp in rpp_grid:
                    knobs = {"fwd_block_n": chunk} if chunk else {}
                    cfg = config_cls(fwd_num_warps=w_, fwd_rows_per_program=rpp, **knobs)
                    ms, clock = _time(lambda cfg=cfg: fwd(cfg), dev)
                    mine = is_default(cfg, ("fwd_num_warps", "fwd_rows_per_program", "fwd_block_n"))
                    name = (f"chunk:{chunk} " if chunk else "") + f"warps {w_:2d} x {rpp} rows"
                    add("fwd", name, ms, clock, 2 * size, mine)
        if with_inductor:
            compiled = torch.compile(eager)
            with torch.no_grad():
                ms, clock = _time(lambda: compiled(x, *params), dev)
            add("fwd", "inductor compiled forward", ms, clock, 2 * size)
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pattern", choices=sorted(FAMILIES), default="layer_norm")
    p.add_argument("--shape", default="8192x4096", help="ROWSxHIDDEN")
    p.add_argument("--pass", dest="passes", choices=("bwd", "fwd", "both"), default="both")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--warps", default=",".join(map(str, WARPS)), help="comma list (both passes)")
    p.add_argument("--per-sm", default=",".join(map(str, PROGRAMS_PER_SM)), help="backward programs per SM")
    p.add_argument("--rows-per-program", default=",".join(map(str, ROWS_PER_PROGRAM)), help="forward")
    p.add_argument("--bwd-kernels", help="comma list of single, chunk:N, split:N (default: by the width)")
    p.add_argument("--no-inductor", action="store_true", help="skip Inductor's rows (no compile)")
    p.add_argument("--sum-tiles", help="layer_norm: comma list of N:P:W reduction tiles (default: the tuner's, "
                   "and the default tile)")
    a = p.parse_args()
    rows, hidden = map(int, a.shape.split("x"))
    passes = ("fwd", "bwd") if a.passes == "both" else (a.passes,)
    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(","))

    bwd_kernels = a.bwd_kernels.split(",") if a.bwd_kernels else None
    for spec in bwd_kernels or []:
        _bwd_kernel_knobs(a.pattern, spec)  # a bad spec fails here, before any timing
    tiles: tuple[tuple[int, int, int], ...] = ()
    if a.pattern == "layer_norm" and "bwd" in passes:
        try:  # a bad tile fails here, before any timing
            tiles = tuple(tuple(int(v) for v in t.split(":")) for t in a.sum_tiles.split(",")) if a.sum_tiles \
                else (LayerNormConfig().sum_tile, *SUM_TILES)
            for n, p_, w_ in tiles:
                LayerNormConfig(sum_block_n=n, sum_block_p=p_, sum_num_warps=w_)
        except ValueError as e:
            p.error(f"--sum-tiles must be a comma list of N:P:W (powers of two, N * P <= 16384, valid warps): {e}")
    results = sweep(a.pattern, rows, hidden, passes, torch.device(a.device), ints(a.warps), ints(a.per_sm),
                    ints(a.rows_per_program), bwd_kernels, not a.no_inductor, tiles)
    print(f"{a.pattern} {rows}x{hidden} bf16; GB/s over the bytes that must move (fwd: x read, y written; "
          "bwd: x, dy read, dx written); * = the default config")
    for pass_name in (*passes, "bwd kernels", "bwd sum"):
        for r in sorted((r for r in results if r["pass"] == pass_name), key=lambda r: r["ms"]):
            mark = "*" if r["default"] else " "
            print(f"{pass_name} {mark} {r['config']:40s} {r['ms']:.4f} ms ({r['clock']})  {r['gbps']:6.0f} GB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pattern": a.pattern, "shape": a.shape, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
