"""The per-GPU disk cache: tuned kernels, the wanted table, and the run-time lookup table."""

from autokernel.cache.fingerprint import default_device, fingerprint, kernels_can_run_on
from autokernel.cache.store import KernelCache, default_cache_dir, entry_problem, row_bucket, tuned_passes

__all__ = [
    "KernelCache", "default_cache_dir", "default_device", "entry_problem", "fingerprint",
    "kernels_can_run_on", "row_bucket", "tuned_passes",
]
