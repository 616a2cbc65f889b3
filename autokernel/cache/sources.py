"""Kernel sources held by cache entries, loaded as Python modules.

Triton compiles a ``@triton.jit`` function from its source file, so a source text from the cache is
written once to ``<cache root>/sources/ak_<sha256>.py`` and imported from there; the module is kept
for the life of the process, one per cache root. The cache does not know what the source computes: the pattern family
looks up the names it needs in the module. Loading executes the text: a cache directory is trusted
as the code it holds (bundles from elsewhere are verified before they are imported into one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def load_source(root: str | os.PathLike, source: str) -> ModuleType:
    """The module ``source`` defines, written under and imported from ``root``'s ``sources/`` folder.

    One module per (cache root, source): the module's file must outlive it (Triton, and Inductor for an
    inline op, read the kernel's source back from that file), and a module loaded from another root's
    folder would break once that folder is gone (a temporary cache, say)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    name = f"autokernel_cache_source_{digest}_{where}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    folder = Path(root) / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ak_{digest}.py"
    if not path.exists() or path.read_text() != source:
        # Write under another name, then rename: a reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
