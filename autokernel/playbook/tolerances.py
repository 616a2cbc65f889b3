"""The one tolerance table: how far a kernel's result may sit from a float64 reference.

Every correctness check in autokernel (the unit tests, ``ak-tune``'s candidate checks, the GPU tests)
compares through :func:`assert_close`, so a tolerance is changed here or nowhere.

An element passes when ``|actual - expected| <= atol * max|expected| + rtol * |expected|``: the absolute
term is scaled by the reference's magnitude so that the same row serves inputs of 1e-3 and of 1e4
(the stability checks use both). The rows allow about two units in the last place of the output
dtype (bf16 has 8 significant bits, fp16 11), which one final rounding of a float32 computation
cannot exceed, plus the float32 accumulation error of long reductions. Measured: the Triton interpreter
(CPU tests) truncates float32 -> bf16 where a GPU rounds to nearest even, so under the interpreter a bf16
result sits up to one unit off instead of half; the bf16 row covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=2e-5, atol=2e-5),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=8e-3),
}


class MismatchError(AssertionError):
    """A result differs from its reference by more than the tolerance table allows."""


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise :class:`MismatchError` naming ``what`` unless ``actual`` matches ``expected``.

    ``expected`` is the float64 (or float32) reference; ``dtype`` picks the tolerance row (the
    dtype the kernel computed for, usually the input dtype). NaN or inf in ``actual`` where the
    reference is finite always fails.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance row for dtype {dtype}; known: {sorted(map(str, TOLERANCES))}")
    if actual.shape != expected.shape:
        raise MismatchError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    tol = TOLERANCES[dtype]
    # Compare on the tensors' own device: moving 8192x8192 float64 tensors to the host costs seconds.
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        raise MismatchError(f"{what}: non-finite values where the reference is finite (or the reverse)")
    scale = e.abs().where(finite, 0.0).max()
    err = (a - e).abs().where(finite, 0.0)
    bound = tol.atol * scale + tol.rtol * e.abs().where(finite, 0.0)
    excess = err - bound
    worst = int(excess.argmax())
    if excess.flatten()[worst] > 0:
        bad = int((excess > 0).sum())
        raise MismatchError(
            f"{what}: {bad} of {e.numel()} elements off (dtype {dtype}, rtol {tol.rtol}, "
            f"atol {tol.atol} x scale {float(scale):.3g}); worst |err| {float(err.flatten()[worst]):.3g} "
            f"vs bound {float(bound.flatten()[worst]):.3g}"
        )
