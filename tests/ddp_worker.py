"""One rank of tests/test_multi_gpu.py::test_ddp_over_gloo_matches_eager_ddp (not a test).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_worker.py CACHE_DIR OUT

Two SGD steps of ``Block`` (RMSNorm, then a SwiGLU MLP, with a residual) under DistributedDataParallel
over gloo, each rank on its own batches: first eager, then ``torch.compile(ddp, backend="autokernel")``
(Dynamo's DDPOptimizer hands the backend the graph) from a fresh copy of the same weights. The second
step's loss depends on the gradients averaged over the ranks. Writes ``OUT.json``: the losses of both
runs, the largest difference between their final weights, and what the backend decided for each pattern
instance (from its compile-time log, as ``tests/models.py:compile_log_statuses`` reads it); and
``OUT.pt``: the compiled run's final weights, to compare across ranks.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
import torch.distributed as dist
from models import compile_log_statuses
from torch import nn
from torch.nn.parallel import DistributedDataParallel

HIDDEN = 64
BATCH = (4, HIDDEN)
STEPS = 2


class Block(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.gate = nn.Linear(hidden, 2 * hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def make_block() -> Block:
    torch.manual_seed(0)
    return Block()


def train(compile_options: dict | None, rank: int) -> tuple[list[float], Block]:
    """STEPS SGD steps of a fresh block under DDP; compiled with backend="autokernel" unless options is None."""
    block = make_block()
    ddp = DistributedDataParallel(block)
    step = ddp if compile_options is None else torch.compile(ddp, backend="autokernel", options=compile_options)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    batches = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(STEPS):
        loss = step(torch.randn(BATCH, generator=batches)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, block


class _Records(logging.Handler):
    """The log records, where ``compile_log_statuses`` looks for them (as on pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main(cache_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = _Records()
    logger = logging.getLogger("autokernel")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    eager, eager_block = train(None, rank)
    compiled, compiled_block = train({"autokernel.cache_dir": cache_dir, "autokernel.record_misses": False}, rank)
    diff = max((a - b).abs().max().item() for a, b in zip(eager_block.parameters(), compiled_block.parameters(),
                                                            strict=True))
    torch.save(compiled_block.state_dict(), f"{out}.pt")
    with open(f"{out}.json", "w") as f:
        json.dump({"rank": rank, "eager": eager, "compiled": compiled, "weights_max_diff": diff,
                   "planned": compile_log_statuses(records)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
