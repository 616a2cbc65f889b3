import gc
import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter; it must be chosen before the
# kernels' modules are imported. On a GPU machine (pytest -m gpu) they are compiled for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


RESERVED_TO_GIVE_BACK = 4 * 2**30  # bytes a test may leave in its worker's allocator cache


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph, guard or recompile count left by the test before."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    # Two xdist workers share one GPU: blocks one test's caching allocator keeps would be missing from the
    # other worker's next test (seen: a worker holding 69 GiB, cross-entropy tests beside it out of memory).
    # Only a test that left much reserved gives it back: with both after every test the GPU suite took 344 s,
    # against ~200 before.
    if torch.cuda.is_available() and torch.cuda.memory_reserved() > RESERVED_TO_GIVE_BACK:
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def cache_dir(tmp_path) -> str:
    """A fresh autokernel cache directory for the test (created on first write)."""
    return str(tmp_path / "akcache")
