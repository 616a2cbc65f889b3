"""A cache entry may hold complete kernel source (what the tuning agent writes): the op loads and launches it."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from models import AGENT_SOURCE as SOURCE
from models import HFLlama, check_hf_llama

import autokernel
from autokernel.cache import KernelCache, row_bucket, runtime
from autokernel.lowering.rms_norm.ops import pattern_key

H = 40


@pytest.fixture(autouse=True)
def _fresh_runtime():
    runtime.invalidate()


def _put(tmp_path, rows, source):
    KernelCache(tmp_path, device="cpu").put_entry({
        "version": 1, "pattern": "rms_norm",
        "pattern_key": pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        "hidden": H, "row_bucket": row_bucket(rows),
        "kernel": {"kind": "source", "source": source, "config": {"fwd_rows_per_program": 2}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "agent"},
        "checks": [], "created": time.time()})


def _run(tmp_path, x):
    model = HFLlama(H).to(torch.bfloat16)
    check_hf_llama(torch.compile(model, backend="autokernel", options={
        "autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"}), model, x)


def test_source_entry_is_loaded_and_launched(tmp_path, monkeypatch):
    import autokernel.lowering.rms_norm.kernels as kernels

    x = torch.randn(7, H, dtype=torch.bfloat16)
    _put(tmp_path, 7, SOURCE)
    assert [i.status for i in autokernel.explain(HFLlama(H).to(torch.bfloat16), x,
                                                 options={"autokernel.cache_dir": str(tmp_path)}).instances] == ["hit"]

    # Prove the built-in single-pass kernels are not the ones running.
    def refuse(*args, **kwargs):
        raise AssertionError("built-in kernel launched")

    monkeypatch.setattr(kernels, "_rms_norm_fwd_single_kernel", {(4,): refuse})
    monkeypatch.setattr(kernels, "_rms_norm_bwd_single_kernel", {})
    _run(tmp_path, x)
    assert len(list((tmp_path / "sources").glob("ak_*.py"))) == 1


def test_source_without_the_contract_names_falls_back(tmp_path, caplog):
    x = torch.randn(7, H, dtype=torch.bfloat16)
    _put(tmp_path, 7, "import triton\n")
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        _run(tmp_path, x)
    assert "defines no rms_norm_fwd_kernel or rms_norm_bwd_kernel" in caplog.text


def test_source_kernel_that_fails_falls_back_to_the_builtin(tmp_path, caplog):
    """A kernel that cannot run here costs the tuned kernel, not the model."""
    broken = SOURCE.replace("r = 1.0 / tl.sqrt(", "r = 1.0 / tl.no_such_function(")
    x = torch.randn(7, H, dtype=torch.bfloat16)
    _put(tmp_path, 7, broken)
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        _run(tmp_path, x)
    assert "the cached rms_norm kernel for (7, 40) failed" in caplog.text


def test_autokernel_verify_rejects_a_wrong_kernel_before_use(tmp_path, caplog, monkeypatch):
    """AUTOKERNEL_VERIFY=1: a cached kernel that computes the wrong thing is caught on first use."""
    wrong = SOURCE.replace("dx = r * (g - n *", "dx = 1.1 * r * (g - n *")
    x = torch.randn(7, H, dtype=torch.bfloat16)
    KernelCache(tmp_path, device="cpu").put_entry({
        "version": 1, "pattern": "rms_norm",
        "pattern_key": pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        "hidden": H, "row_bucket": row_bucket(7), "shape": [7, H], "dtype": "bf16",
        "flags": {"mode": "llama", "offset": 0.0, "weight": "bf16", "out": "bf16"},
        "kernel": {"kind": "source", "source": wrong, "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "agent"},
        "checks": [], "created": time.time()})
    monkeypatch.setenv("AUTOKERNEL_VERIFY", "1")
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        report = autokernel.explain(HFLlama(H).to(torch.bfloat16), x, options={"autokernel.cache_dir": str(tmp_path)})
        _run(tmp_path, x)  # the answer is right: the wrong kernel was never used
    assert [i.status for i in report.instances] == ["declined"]
    assert "failed AUTOKERNEL_VERIFY: CheckFailed: shape sweep" in report.instances[0].reason
    assert "failed verification" in caplog.text


def test_autokernel_verify_passes_a_correct_kernel(tmp_path, monkeypatch):
    x = torch.randn(7, H, dtype=torch.bfloat16)
    _put(tmp_path, 7, SOURCE)
    entry = next(e for _, e in KernelCache(tmp_path, device="cpu").entries())
    entry.update(flags={"mode": "llama", "offset": 0.0, "weight": "bf16", "out": "bf16"}, dtype="bf16")
    KernelCache(tmp_path, device="cpu").put_entry(entry)
    monkeypatch.setenv("AUTOKERNEL_VERIFY", "1")
    report = autokernel.explain(HFLlama(H).to(torch.bfloat16), x, options={"autokernel.cache_dir": str(tmp_path)})
    assert [i.status for i in report.instances] == ["hit"]


def test_a_source_is_written_under_each_cache_root_that_serves_it(tmp_path):
    """The module's file must outlive it: a second cache root gets its own file and module, so deleting
    the first root (a temporary cache) cannot break what the second one serves."""
    import shutil
    from pathlib import Path

    from autokernel.cache.sources import load_source

    source = SOURCE + "\n# test_a_source_is_written_under_each_cache_root_that_serves_it\n"
    first = load_source(tmp_path / "a", source)
    second = load_source(tmp_path / "b", source)
    assert first is not second and load_source(tmp_path / "b", source) is second
    shutil.rmtree(tmp_path / "a")
    path = Path(second.__file__)
    assert path.read_text() == source and path.parent == tmp_path / "b" / "sources"
