"""A cache entry may hold complete kernel source (what the tuning agent writes): the op loads and launches it."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from models import HFLlama

import autokernel
from autokernel.cache import KernelCache, row_bucket, runtime
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook.tolerances import assert_close

# An independent implementation of the kernel contract (autokernel.lowering.rms_norm.kernels.SourceKernels).
SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset,
                        HAS_WEIGHT: tl.constexpr, LLAMA: tl.constexpr, SAVE_RSTD: tl.constexpr,
                        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    for i in range(ROWS_PER_PROGRAM):
        row = tl.cast(tl.minimum(tl.program_id(0) * ROWS_PER_PROGRAM + i, n_rows - 1), tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + tl.cast(eps, tl.float32))
        n = x * r
        if LLAMA:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            n = n * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32))
        tl.store(Y + row * stride_y + cols, n.to(Y.dtype.element_ty), mask=mask)
        if SAVE_RSTD:
            tl.store(RSTD + row, r)


@triton.jit
def rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                        HAS_WEIGHT: tl.constexpr, LLAMA: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row)
        n = x * r
        g = dy * w
        dx = r * (g - n * (tl.sum(g * n, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if LLAMA:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        dw += dy * n
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols, dw, mask=mask)
'''

H = 40


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    runtime.invalidate()
    yield
    torch._dynamo.reset()


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
    compiled = torch.compile(model, backend="autokernel",
                             options={"autokernel.cache_dir": str(tmp_path), "autokernel.compiler": "aot_eager"})
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.double().requires_grad_(True)
    w64 = model.weight.detach().double().requires_grad_(True)
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    y64 = w64 * h.to(torch.bfloat16).double()
    y64.backward(dy.double())
    assert_close(y, y64, torch.bfloat16, "y")
    assert_close(xr.grad, x64.grad, torch.bfloat16, "dx")
    assert_close(model.weight.grad, w64.grad, torch.bfloat16, "dw")


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
