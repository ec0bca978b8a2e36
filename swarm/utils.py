"""Small helpers shared by entry points."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where available (STYLE 9: one loop per process)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    return uvloop.run(main)


def exit_after_distributed(code: int = 0) -> NoReturn:
    """End a process that used a torch.distributed gloo group: flush, then exit without finalizing.

    Gloo's worker threads drop their last reference to a finished collective's tensors a moment
    after the caller's wait returns, and that drop takes the GIL. If the interpreter is finalizing
    by then, CPython (3.11) ends the thread from inside C++ code that cannot unwind, and the whole
    process aborts: SIGABRT, "terminate called without an active exception" (core dump of a
    `bench_convergence` baseline rank; 3 of 25 runs). Skipping finalization closes that window.
    Call it only when everything the process owes is written.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing more can reach it
            pass
    os._exit(code)
