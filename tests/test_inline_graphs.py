"""What AOTAutograd hands Inductor for each inline training op, checked on the CPU (tests/inline_graphs_worker.py
builds the graphs in a process without the Triton interpreter).

No forward allocation may be saved for the backward. AOTAutograd's CSE merges equal allocations of the forward
and the backward unless they are ``aten.empty``: RoPE's outputs and gradients, once allocated with
``torch.empty_strided`` in their inputs' layout, became one buffer, saved from the forward (an activation that
holds nothing) and, because the forward returned it, copied by Inductor before each kernel wrote it: a full copy
of q and of k in each pass (H100, benchmarks/results/rope_context_h100.txt). Hence also: no ``empty_strided``, and
no copy left once Inductor's post-grad passes have run (its reinplacing writes each kernel's outputs in place).
And in context, transformers models' training steps (Llama and GPT-NeoX, SDPA and eager attention): what a
pattern kernel saves alone must not be lost to copies around it, so autokernel's graphs may copy no more elements
than Inductor's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("inline_graphs_worker.py")
OPS = ("rms_norm", "add_rms_norm", "layer_norm", "softmax", "swiglu", "cross_entropy", "rope")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", OPS)
def test_nothing_saved_or_copied_that_a_kernel_writes(report, op) -> None:
    assert report[op]["graphs"] == ["fw", "bw"], report[op]
    assert report[op]["saved_allocations"] == [], report[op]
    assert report[op]["empty_strided"] == [], report[op]
    assert report[op]["copies"] == [], report[op]


@pytest.mark.parametrize("step", ["llama_sdpa", "llama_eager", "gpt_neox_sdpa", "gpt_neox_eager"])
def test_a_training_step_copies_no_more_than_inductor(report, step) -> None:
    found = report["steps"][step]
    assert found["autokernel"]["kernels"] > 0, found  # the rewrites happened: our kernels are in the graphs
    copied = {impl: sum(math.prod(shape) for _, shape in found[impl]["copies"]) for impl in ("autokernel", "inductor")}
    assert copied["autokernel"] <= copied["inductor"], (copied, found)
