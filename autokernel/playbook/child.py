"""Child interpreters that answer requests over two pipes: the tuner's worker (:mod:`.worker`) and the
precompiler's compilers (:mod:`.precompile`).

A fresh interpreter rather than multiprocessing's spawn: spawn re-imports the parent's ``__main__``, which
runs a user's unguarded script (one that calls the tuner at top level) a second time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def spawn(module: str, args: dict[str, Any]) -> tuple[subprocess.Popen, Connection, Connection]:
    """Start ``python -m module FD_IN FD_OUT ARGS_JSON``; return the process, the connection to it and the
    connection from it."""
    child_in, parent_out = os.pipe()
    parent_in, child_out = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", module, str(child_in), str(child_out), json.dumps(args)],
                            pass_fds=(child_in, child_out), stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(child_in)
    os.close(child_out)
    return proc, Connection(parent_out, readable=False), Connection(parent_in, writable=False)


def run_child(serve: Callable[..., None]) -> None:
    """In the child (its ``__main__``): ``serve(requests_in, answers_out, **args)`` on what :func:`spawn` passed."""
    fd_in, fd_out, args = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    serve(Connection(fd_in, writable=False), Connection(fd_out, readable=False), **args)
