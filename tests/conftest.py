import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter; it must be chosen before the
# kernels' modules are imported. On a GPU machine (pytest -m gpu) they are compiled for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
