"""Small helpers shared by entry points."""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
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


# Run by a fresh interpreter before the real command: the parent-death signal survives execve, so
# the command itself never needs to know. A parent that died before the prctl sent nothing; the shim
# is reparented by then, so it exits before running anything.
_DIES_WITH_PARENT_SHIM = """import ctypes, os, sys
ctypes.CDLL(None).prctl(1, int(sys.argv[2]))  # PR_SET_PDEATHSIG, kept across exec
if os.getppid() != int(sys.argv[1]):
    os._exit(128 + int(sys.argv[2]))
os.execv(sys.argv[3], sys.argv[3:])
"""


def dies_with_parent(cmd: list[str], signum: int = signal.SIGTERM) -> list[str]:
    """`cmd` wrapped so that it gets `signum` when this process dies, however it dies (Linux).

    A child in its own session (so a terminal's Ctrl-C reaches only its parent) would otherwise
    outlive a parent that was SIGKILLed. A `preexec_fn` could set the signal without the wrapper,
    but it forces a real fork() in a process whose gRPC threads then print warnings ("skipping
    fork() handlers") into the user's terminal, and running Python between fork and exec is unsafe
    with threads. The wrapper execs `cmd` in place, so the child's pid is the command's.

    Args:
        cmd: the command, its first element an absolute path or a name on PATH.
        signum: the signal sent on the parent's death (default SIGTERM: the child cleans up).

    Returns:
        The argv to start instead of `cmd` (`cmd` itself off Linux).
    """
    if not sys.platform.startswith("linux"):
        return cmd
    import shutil

    program = cmd[0] if os.path.isabs(cmd[0]) else (shutil.which(cmd[0]) or cmd[0])
    return [sys.executable, "-c", _DIES_WITH_PARENT_SHIM, str(os.getpid()), str(int(signum)), program, *cmd[1:]]


def check_device(name: str, flag: str = "--device") -> None:
    """Fail early, in one line, on a device this machine's torch cannot use.

    Raises:
        ValueError: `name` is no device torch knows, or names CUDA (or MPS) where there is none;
            the message says what to do.
    """
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{flag} {name}: {why} (torch {torch.__version__}); use {flag} cpu, or install a "
                             "CUDA build of torch (README: Installing with a GPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only: 127.0.0.0/8, ::1 or localhost.
    Any other name or address (0.0.0.0, ::, a hostname, a LAN address) counts as exposed."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unshadow_kernels() -> None:
    """Python started in this repository's root (`python -m`, pytest) finds its `kernels/` folder (installed as
    `swarm.kernels`) under the bare name `kernels` first, which hides Hugging Face's `kernels` package that
    transformers imports. Load the installed one under that name instead (or none, when it is not installed)."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "topk_select.py").is_file():
        return  # not ours
    ours = Path(spec.origin).parent.parent.resolve()
    real = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != ours])
    if real is None or real.loader is None:
        sys.modules["kernels"] = None  # type: ignore[assignment]  # find_spec answers None: "not installed"
        return
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    real.loader.exec_module(module)
