"""The precompiler on CUDA (marker ``gpu``): a candidate it compiled compiles nothing when the worker runs it,
its checks and its timing included (every kernel, launcher and specialization was already in Triton's cache)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from autokernel.lowering import families
from autokernel.playbook.precompile import Precompiler
from autokernel.playbook.tuner import TuneRequest, Worker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]


def _entries(root: str) -> set[str]:
    return set(os.listdir(root)) if os.path.isdir(root) else set()


@pytest.mark.parametrize(("pattern", "flags", "shape"), [
    ("rms_norm", {}, [1000, 1000]),  # a width that is no multiple of 16; a persistent backward grid
    ("softmax", {"op": "softmax"}, [777, 2048]),
])
def test_a_precompiled_candidate_compiles_nothing_in_the_worker(tmp_path, monkeypatch, pattern, flags, shape):
    triton_cache = str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", triton_cache)  # the children inherit it: one fresh cache for both
    request = TuneRequest(pattern, flags, "bf16", shape)
    config = families()[pattern].problem(flags, "bf16", shape, "cuda").default_candidate()
    worker = Worker(request, torch.device("cuda"), None, timeout_s=300)
    pre = Precompiler(worker.args, 1)
    try:
        pre.ahead([config])
        deadline = time.time() + 300
        while pre.state(config) == "pending" and time.time() < deadline:
            time.sleep(0.2)
        assert pre.state(config) == "done"
        compiled = _entries(triton_cache)
        assert compiled, "the precompiler wrote nothing into Triton's cache"
        reply = worker.call("candidate", config)
        assert reply["status"] == "ok", reply
        assert _entries(triton_cache) - compiled == set(), "the worker compiled what the precompiler had not"
    finally:
        pre.stop()
        worker.stop()
