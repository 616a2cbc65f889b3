"""RMSNorm Triton kernels against the float64 reference (forward, and backward through autograd).

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), so the
shapes are tiny.
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch  # noqa: E402

from autokernel.lowering.rms_norm.kernels import (  # noqa: E402
    MAX_SINGLE_PASS_BLOCK,
    RmsNormConfig,
    default_config,
    effective_config,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)
from autokernel.playbook.tolerances import assert_close  # noqa: E402

EPS = 1e-6
SINGLE = RmsNormConfig(fwd_num_warps=1, bwd_num_warps=1)
# One program per "SM" (4 on CPU), so the persistent backward loops over several rows per program.
PERSISTENT = RmsNormConfig(fwd_num_warps=1, bwd_num_warps=1, bwd_programs_per_sm=1, fwd_rows_per_program=3)
CHUNKED = RmsNormConfig(
    fwd_num_warps=1, bwd_num_warps=1, bwd_programs_per_sm=1, fwd_rows_per_program=2, block_n=64, fwd_block_n=64
)
# The split backward: column blocks x row groups (300 columns: blocks of 128, 128 and 44; 7 rows: 8 programs
# on 4 "SMs" make 2 row groups, of 4 rows and 3).
SPLIT = RmsNormConfig(fwd_num_warps=1, bwd_num_warps=1, bwd_programs_per_sm=2, bwd_split_n=128)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _check(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mode: str,
    config: RmsNormConfig,
    offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    dy: torch.Tensor | None = None,
) -> None:
    """Forward, rstd, dx and dw of the kernels against autograd through the float64 reference."""
    out_dtype = out_dtype or x.dtype
    y, rstd = rms_norm_fwd(x, weight, EPS, offset, mode, out_dtype, config, save_rstd=True)
    assert y.shape == x.shape and y.dtype == out_dtype and y.is_contiguous()
    assert rstd is not None and rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32

    xr = x.detach().clone().requires_grad_(True)
    wr = weight.detach().clone().requires_grad_(True) if weight is not None else None
    ref = rms_norm_reference(xr, wr, EPS, offset, mode, out_dtype)
    assert ref.dtype == torch.float64
    assert_close(y, ref, x.dtype, "y")
    ref_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    assert_close(rstd, ref_rstd, torch.float32, "rstd")

    if dy is None:
        dy = _randn(*x.shape, dtype=out_dtype, seed=1234)
    ref.backward(dy.double())
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, offset, mode, config)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    assert_close(dx, xr.grad, x.dtype, "dx")
    if weight is None:
        assert dw is None
    else:
        assert dw is not None and dw.shape == weight.shape and dw.dtype == weight.dtype
        assert_close(dw, wr.grad, x.dtype, "dw")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_dtypes_modes_offsets(dtype: torch.dtype, mode: str, offset: float) -> None:
    x = _randn(5, 37, dtype=dtype, seed=0)
    w = _randn(37, dtype=dtype, seed=1, scale=0.5)
    _check(x, w, mode, PERSISTENT, offset=offset)


@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("config", [SINGLE, CHUNKED, SPLIT], ids=["single", "chunked", "split"])
def test_no_weight(mode: str, config: RmsNormConfig) -> None:
    # offset is ignored without a weight
    _check(_randn(6, 100, dtype=torch.bfloat16, seed=2), None, mode, config, offset=1.0)


@pytest.mark.parametrize("mode", ["llama", "gemma"])
def test_fp32_out_from_bf16(mode: str) -> None:
    x = _randn(4, 100, dtype=torch.bfloat16, seed=3)
    w = _randn(100, dtype=torch.float32, seed=4)
    _check(x, w, mode, SINGLE, offset=1.0, out_dtype=torch.float32)


@pytest.mark.parametrize(
    "shape", [(37,), (1, 37), (7, 37), (2, 3, 1, 37)], ids=["rank1", "one_row", "rank2", "rank4"]
)
def test_ranks(shape: tuple[int, ...]) -> None:
    x = _randn(*shape, dtype=torch.float16, seed=5)
    w = _randn(37, dtype=torch.float16, seed=6)
    _check(x, w, "llama", PERSISTENT)


@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", [CHUNKED, SPLIT], ids=["chunked", "split"])
def test_chunked_non_multiple(mode: str, dtype: torch.dtype, config: RmsNormConfig) -> None:
    # H = 300 with 64-wide chunks: four full chunks and a ragged one; 7 rows over 2-row forward programs
    # and 4 persistent backward programs. Split: see SPLIT.
    x = _randn(7, 300, dtype=dtype, seed=7)
    w = _randn(300, dtype=dtype, seed=8)
    _check(x, w, mode, config, offset=1.0)


@pytest.mark.parametrize("config", [SINGLE, PERSISTENT, CHUNKED, SPLIT],
                         ids=["single", "persistent", "chunked", "split"])
def test_non_contiguous_rows(config: RmsNormConfig) -> None:
    big = _randn(9, 160, dtype=torch.bfloat16, seed=9)
    x = big[:, :100]
    dy = _randn(9, 130, dtype=torch.bfloat16, seed=10)[:, :100]
    assert not x.is_contiguous() and x.stride(-1) == 1
    w = _randn(100, dtype=torch.bfloat16, seed=11)
    _check(x, w, "llama", config, offset=1.0, dy=dy)


def test_non_unit_column_stride() -> None:
    x = _randn(100, 5, dtype=torch.float32, seed=12).t()
    assert x.stride(-1) != 1
    _check(x, _randn(100, dtype=torch.float32, seed=13), "gemma", SINGLE)


@pytest.mark.parametrize("scale", [1e4, 1e-3], ids=["large", "small"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitudes(scale: float, dtype: torch.dtype) -> None:
    x = _randn(5, 64, dtype=dtype, seed=14, scale=scale)
    w = _randn(64, dtype=dtype, seed=15)
    _check(x, w, "llama", PERSISTENT)
    _check(x, w, "gemma", CHUNKED, offset=1.0)


@pytest.mark.parametrize("config", [SINGLE, CHUNKED, SPLIT], ids=["single", "chunked", "split"])
def test_zero_row(config: RmsNormConfig) -> None:
    x = _randn(5, 100, dtype=torch.float32, seed=16)
    x[2] = 0.0
    w = _randn(100, dtype=torch.float32, seed=17)
    _check(x, w, "gemma", config, offset=1.0)


@pytest.mark.parametrize("config", [PERSISTENT, CHUNKED, SPLIT], ids=["single", "chunked", "split"])
def test_deterministic(config: RmsNormConfig) -> None:
    x = _randn(11, 300, dtype=torch.bfloat16, seed=18)
    w = _randn(300, dtype=torch.bfloat16, seed=19)
    dy = _randn(11, 300, dtype=torch.bfloat16, seed=20)
    runs = []
    for _ in range(2):
        y, rstd = rms_norm_fwd(x, w, EPS, 1.0, "llama", torch.bfloat16, config, save_rstd=True)
        dx, dw = rms_norm_bwd(dy, x, w, rstd, 1.0, "llama", config)
        runs.append((y, rstd, dx, dw))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_zero_rows() -> None:
    x = torch.empty(0, 16, dtype=torch.bfloat16)
    w = _randn(16, dtype=torch.bfloat16, seed=21)
    y, rstd = rms_norm_fwd(x, w, EPS, 0.0, "llama", torch.bfloat16, SINGLE, save_rstd=True)
    assert y.shape == (0, 16) and rstd is not None and rstd.shape == (0,)
    dx, dw = rms_norm_bwd(torch.empty(0, 16, dtype=torch.bfloat16), x, w, rstd, 0.0, "llama", SINGLE)
    assert dx.shape == (0, 16) and dw is not None and torch.equal(dw, torch.zeros_like(w))


def test_no_rstd() -> None:
    x = _randn(3, 37, dtype=torch.float32, seed=22)
    y, rstd = rms_norm_fwd(x, None, EPS, 0.0, "gemma", torch.float32, SINGLE, save_rstd=False)
    assert rstd is None
    assert_close(y, rms_norm_reference(x, None, EPS, 0.0, "gemma", torch.float32), torch.float32, "y")


def test_wide_row_with_single_pass_config() -> None:
    # A single-pass config on a row too wide for one block must still run (switched to chunks).
    hidden = MAX_SINGLE_PASS_BLOCK + 1000
    x = _randn(2, hidden, dtype=torch.float32, seed=23)
    w = _randn(hidden, dtype=torch.float32, seed=24)
    _check(x, w, "gemma", RmsNormConfig(), offset=1.0)


def test_bad_arguments() -> None:
    x = _randn(2, 8, dtype=torch.float32, seed=25)
    with pytest.raises(ValueError, match="mode"):
        rms_norm_fwd(x, None, EPS, 0.0, "mistral", torch.float32, SINGLE, save_rstd=True)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fwd(x, torch.ones(9), EPS, 0.0, "llama", torch.float32, SINGLE, save_rstd=True)


def test_config_round_trip() -> None:
    cfg = RmsNormConfig(
        fwd_num_warps=4,
        fwd_rows_per_program=3,
        bwd_num_warps=16,
        bwd_programs_per_sm=2,
        block_n=1024,
        num_stages=2,
        fwd_block_n=2048,
        bwd_split_n=512,
    )
    assert RmsNormConfig.from_dict(cfg.to_dict()) == cfg
    assert RmsNormConfig.from_dict({}) == RmsNormConfig()


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({"fwd_num_warp": 4}, "fwd_num_warp"),
        ({"fwd_num_warps": "8"}, "fwd_num_warps"),
        ({"bwd_num_warps": 8.0}, "bwd_num_warps"),
        ({"fwd_rows_per_program": True}, "fwd_rows_per_program"),
        ({"fwd_num_warps": 3}, "fwd_num_warps"),
        ({"bwd_num_warps": 64}, "bwd_num_warps"),
        ({"block_n": 48}, "block_n"),
        ({"block_n": -64}, "block_n"),
        ({"fwd_block_n": 96}, "fwd_block_n"),
        ({"bwd_split_n": 65536}, "bwd_split_n"),
        ({"fwd_rows_per_program": 0}, "fwd_rows_per_program"),
        ({"bwd_programs_per_sm": -1}, "bwd_programs_per_sm"),
        ({"num_stages": 0}, "num_stages"),
    ],
)
def test_config_from_dict_errors(d: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RmsNormConfig.from_dict(d)


def test_effective_config() -> None:
    single = RmsNormConfig()
    assert effective_config(single, 4096) == single
    wide = effective_config(single, 100_000)
    assert wide.block_n > 0 and wide.fwd_num_warps == single.fwd_num_warps
    assert wide.fwd_block_n > 0
    chunked = RmsNormConfig(block_n=64, fwd_block_n=128)
    assert effective_config(chunked, 300) == chunked
    # one chunk covers the row: the single-pass kernel does the same work with one read
    assert effective_config(chunked, 37).block_n == 0
    assert effective_config(chunked, 64).block_n == 0
    assert effective_config(chunked, 128) == RmsNormConfig(block_n=64)
    # each pass chunks on its own: a chunked backward leaves the forward whole
    backward_only = effective_config(RmsNormConfig(block_n=64), 300)
    assert backward_only.chunked and not backward_only.fwd_chunked


@pytest.mark.parametrize("hidden", [1, 37, 4096, 8192, 32768, 100_000, 262_144])
def test_default_config(hidden: int) -> None:
    cfg = default_config(hidden, 8192, torch.bfloat16)
    assert RmsNormConfig.from_dict(cfg.to_dict()) == cfg
    assert effective_config(cfg, hidden) == cfg
    assert (cfg.fwd_block_n > 0) == (hidden > MAX_SINGLE_PASS_BLOCK)
    # The backward holds the row whole up to 16K columns, splits it at 32K (the whole row spills there) and
    # chunks it beyond.
    assert (cfg.bwd_split_n > 0) == (16384 < hidden <= MAX_SINGLE_PASS_BLOCK)
    assert (cfg.block_n > 0) == (hidden > MAX_SINGLE_PASS_BLOCK)


def test_wide_rows_candidates() -> None:
    """Rows of 16K and wider: the forward's chunk widths are candidates; at 16K the backward tries the
    single-pass kernels first, then the split and the chunked ones; from 32K (where a whole row spills) the
    split, the chunked, and the single-pass ones last."""
    from autokernel.lowering.rms_norm.problem import RmsNormProblem

    def kinds(hidden: int) -> tuple[list[str], list[str]]:
        candidates = RmsNormProblem({"mode": "llama"}, "bf16", [2048, hidden], "cpu").candidates()
        fwd = ["chunked" if c["fwd_block_n"] else "whole" for phase, c in candidates if phase == "fwd"]
        bwd = ["split" if c["bwd_split_n"] else "chunked" if c["block_n"] else "single"
               for phase, c in candidates if phase == "bwd"]
        return fwd, bwd

    fwd, bwd = kinds(16384)
    assert "chunked" in fwd and fwd[0] == "whole"
    order = ["single", "split", "chunked"]
    assert bwd == sorted(bwd, key=order.index) and set(bwd) == set(order)
    fwd, bwd = kinds(32768)
    order = ["split", "chunked", "single"]
    assert bwd == sorted(bwd, key=order.index) and set(bwd) == set(order)
    # Beyond 32K a whole row cannot be one block: the "single" candidates run chunked (fit_chunks).
    fwd, bwd = kinds(40000)
    assert set(bwd) == {"split", "chunked", "single"} and bwd[-1] == "single"
    fwd, bwd = kinds(4096)
    assert set(fwd) == {"whole"} and set(bwd) == {"single"}
