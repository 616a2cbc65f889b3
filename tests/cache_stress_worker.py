"""One worker of tests/test_cache_robustness.py::test_eight_models_and_ak_tune_share_one_cache (not a test).

    python tests/cache_stress_worker.py ROUND WAIT_FILE [ROUND WAIT_FILE ...] LAST_ROUND

Rounds of compiles: compile tests/models.py's HFLlama with backend="autokernel" for each shape of a
ROUND (``rowsxhidden``, comma-separated; ``torch._dynamo.reset()`` before each, so each compile looks
the cache up again and records its miss or serves the entry), checking y, dx and dw against float64
each time. Between rounds, until the round's WAIT_FILE appears (the test writes it when ak-tune has
written some entries), the worker rereads the cache's entry table every 0.25 s the way each compile does
(``runtime.invalidate`` + ``runtime.table_for``): cheap reads that overlap ak-tune's writes, where
repeated compiles would cost this 2-core machine seconds each. The cache is ``$AUTOKERNEL_CACHE_DIR``.

What the backend did with each instance comes from its own compile-time log (the ``AUTOKERNEL_LOG=info``
lines), so the misses counted here are the misses it recorded. Any warning from the ``autokernel``
logger (a malformed entry skipped, an unreadable cache, a miss that could not be recorded, a failed
rewrite) makes the worker exit 1. The last stdout line is a JSON report: ``{"rounds": [[[rows, hidden,
status], ...], ...], "waits": [{"reads": n, "first_seen": {hidden: index of the read that first
saw an entry for it}}, ...],
"warnings": [...]}``, one status per pattern instance planned, one wait per WAIT_FILE.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import torch
from models import HFLlama, check_hf_llama

from autokernel.cache import runtime
from autokernel.cache.store import default_cache_dir

# What autokernel.backend._log writes for each instance it planned, e.g.
# "autokernel: rms_norm miss bf16 4x32 at ...: no tuned kernel for ...".
_PLANNED = re.compile(r"^autokernel: (\S+) (hit|miss|declined) (\S+) (\S+) at ")


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.statuses: list[tuple[str, str]] = []  # (status, shape text) in order
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
            return
        m = _PLANNED.match(message)
        if m:
            self.statuses.append((m.group(2), m.group(4)))


def _shape(text: str) -> tuple[int, int]:
    rows, hidden = (int(p) for p in text.split("x"))
    return rows, hidden


def _read_until(path: Path, timeout_s: float = 300.0) -> dict[str, object]:
    """Reread the entry table until ``path`` exists, once more after that: how often, and at which read
    each hidden size's entry first appeared."""
    root = str(default_cache_dir())
    device = torch.device("cpu")
    deadline = time.time() + timeout_s
    reads, first_seen = 0, {}
    while True:
        finished = path.exists()  # looked at before the read: the last read sees all written before the file
        runtime.invalidate(root)
        for _key, hidden in runtime.table_for(root, device):  # logs a warning for any malformed entry
            first_seen.setdefault(hidden, reads)
        reads += 1
        if finished:
            return {"reads": reads, "first_seen": first_seen}
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s (is ak-tune still running?)")
        time.sleep(0.25)


def main(argv: list[str]) -> int:
    if len(argv) % 2 != 1:
        raise SystemExit(f"expected ROUND WAIT_FILE pairs and a LAST_ROUND, got {argv}")
    specs = argv  # ROUND, WAIT_FILE, ROUND, ..., LAST_ROUND
    recorder = _Recorder()
    log = logging.getLogger("autokernel")
    log.setLevel(logging.INFO)  # the per-instance lines are INFO
    log.addHandler(recorder)

    def compile_and_check(rows: int, hidden: int) -> list[list]:
        torch._dynamo.reset()
        model = HFLlama(hidden).to(torch.bfloat16)
        x = torch.randn(rows, hidden, dtype=torch.bfloat16)
        before = len(recorder.statuses)
        compiled = torch.compile(model, backend="autokernel", options={"autokernel.compiler": "aot_eager"})
        check_hf_llama(compiled, model, x)
        planned = []
        for status, shape in recorder.statuses[before:]:
            if shape != f"{rows}x{hidden}":
                raise AssertionError(f"compiled {rows}x{hidden} but the backend planned an instance of {shape}")
            planned.append([rows, hidden, status])
        return planned

    rounds: list[list[list]] = []
    waits: list[dict[str, object]] = []
    for i in range(0, len(specs), 2):
        rounds.append([item for s in specs[i].split(",") for item in compile_and_check(*_shape(s))])
        if i + 1 < len(specs):
            waits.append(_read_until(Path(specs[i + 1])))
    print(json.dumps({"rounds": rounds, "waits": waits, "warnings": recorder.warnings}), flush=True)
    if recorder.warnings:
        print(f"autokernel warned {len(recorder.warnings)} time(s): {recorder.warnings}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
