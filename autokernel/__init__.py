"""autokernel: tuned Triton kernels from a per-GPU disk cache, served inside ``torch.compile``.

``torch.compile(model, backend="autokernel")`` works after ``pip install`` (entry point
``torch_dynamo_backends``); ``autokernel.backend`` is the same callable, ``autokernel.explain``
reports what it does with each pattern instance.
"""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"

_logger = logging.getLogger("autokernel")
_level = os.environ.get("AUTOKERNEL_LOG", "").strip().upper()
if _level:
    _logger.setLevel(getattr(logging, _level, logging.INFO))
    if not _logger.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("[%(name)s %(levelname)s] %(message)s"))
        _logger.addHandler(_handler)

from autokernel.backend import backend as backend  # noqa: E402
from autokernel.backend import explain as explain  # noqa: E402
from autokernel.backend.report import InstanceReport, Report  # noqa: E402

__all__ = ["InstanceReport", "Report", "__version__", "backend", "explain"]
