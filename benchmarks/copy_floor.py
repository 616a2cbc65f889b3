"""How close a plain copy of the same bytes comes to the DRAM floor, per shape (GPU).

python benchmarks/copy_floor.py [--shapes 8192x8192,2048x4096] [--out DIR]

The floor of a memory-bound pattern is its bytes moved over the copy bandwidth of a 1 GiB copy
(``timing.copy_gbps``). A small transfer cannot reach that rate: launch, ramp-up and the last wave's tail are a
fixed few microseconds. An RMSNorm forward reads ``x`` and writes ``y`` of one shape, which is exactly what
``y.copy_(x)`` moves: its time, measured the way every kernel here is (one CUDA graph replayed, L2 flushed between
replays), says what share of the floor any kernel can reach at that shape. Writes ``copy_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autokernel.playbook.timing import copy_gbps, graph_ms  # noqa: E402

SHAPES = "8192x8192,8192x4096,2048x1024,2048x4096,2048x8192,2048x16384,2048x32768"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help=f"comma list of ROWSxHIDDEN, bf16 (default {SHAPES})")
    p.add_argument("--out", default=".", help="folder for copy_floor.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("copy_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gbps = copy_gbps(device)
    rows = []
    for text in args.shapes.split(","):
        r, h = (int(v) for v in text.split("x"))
        x = torch.randn(r, h, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        moved = 2 * x.numel() * x.element_size()
        floor_ms = moved / (gbps * 1e9) * 1e3
        ms = graph_ms(lambda x=x, y=y: y.copy_(x), device)
        rows.append({"shape": text, "mib_moved": moved / 2**20, "floor_ms": floor_ms, "copy_ms": ms,
                     "copy_pct_of_floor": 100 * floor_ms / ms if ms else None})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "copy_floor.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "copy_gbps": gbps, "rows": rows}, indent=1) + "\n")
    print(f"copy bandwidth {gbps:.0f} GB/s ({torch.cuda.get_device_name()})")
    print("| shape (bf16) | MiB moved | floor ms | copy ms | copy % of floor |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['mib_moved']:.0f} | {row['floor_ms']:.4f} | {row['copy_ms']:.4f} | "
              f"{row['copy_pct_of_floor']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
