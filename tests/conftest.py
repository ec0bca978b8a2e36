"""Shared fixtures: coordinators on port 0, as a real subprocess or in this test's event loop.

Nothing started here outlives its test: every fixture stops (or SIGKILLs) what it
started in its own teardown, so no session-wide cleanup is needed (STYLE 12).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from swarm.coordinator import server as coordinator_server
from swarm.coordinator.client import ClientConfig, CoordinatorClient
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.store import MemoryStore
from swarm.utils import unshadow_kernels

unshadow_kernels()  # pytest puts the repo root on sys.path: its kernels/ would hide the package transformers imports

REPO = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT_S = 20.0
"""A coordinator subprocess that prints no `listening` line within this long fails the test."""

_LISTENING = re.compile(r"^coordinator listening on (?P<host>.+):(?P<port>\d+)$")

FAST_CONFIG: dict[str, Any] = {
    "run_id": "test-run",
    "lease_s": 1.0,
    "heartbeat_interval_s": 0.25,
    "rendezvous_timeout_s": 1.0,
    "attempt_timeout_s": 3.0,
    "tick_interval_s": 0.02,
}
"""Coordinator settings that make leases and deadlines expire within a test's patience."""


# ------------------------------------------------------------------ subprocess


def wait_peer_joined(proc: subprocess.Popen[Any], log_path: Path, timeout_s: float) -> bool:
    """Whether a `swarm --log-level INFO peer` process logged its join within `timeout_s` (False once it exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if "joined run" in log_path.read_text():
            return True
        time.sleep(0.05)
    return False


@dataclass(slots=True)
class CoordinatorProcess:
    """A `swarm coordinator` subprocess that printed its listening address."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    stderr_path: Path
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def target(self) -> str:
        """host:port for clients."""
        return f"{self.host}:{self.port}"

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the process (a crash: no flush, no graceful shutdown) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=timeout_s)
        self._close_files()

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM the process and wait for it to exit; returns its exit code.

        Raises:
            AssertionError: it did not exit within `timeout_s` (it is SIGKILLed first).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"coordinator ignored SIGTERM for {timeout_s}s and was killed; stderr:\n{self.stderr()}"
            ) from None
        self._close_files()
        return code

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


def _wait_listening(proc: subprocess.Popen[bytes], stderr_path: Path) -> tuple[str, int]:
    """The (host, port) from the first stdout line, or fail with the process's stderr.

    Reads the pipe as soon as it is readable, so a caller can act (e.g. signal the
    process) the moment the line is printed, as a supervisor would.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"coordinator printed no 'coordinator listening on' line within {STARTUP_TIMEOUT_S}s; "
                f"stdout so far {data!r}; stderr:\n{stderr_path.read_text(errors='replace')}"
            )
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # EOF: the process is gone
            try:
                code: int | None = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                code = None
            raise AssertionError(
                f"coordinator closed stdout (exit code {code}) before listening; stdout {data!r}; "
                f"stderr:\n{stderr_path.read_text(errors='replace')}"
            )
        data += chunk
    first = data.split(b"\n", 1)[0].decode(errors="replace")
    m = _LISTENING.match(first)
    if m is None:
        raise AssertionError(
            f"coordinator's first stdout line is {first!r}, expected 'coordinator listening on HOST:PORT'; "
            f"stderr:\n{stderr_path.read_text(errors='replace')}"
        )
    return m["host"], int(m["port"])


StartCoordinator = Callable[..., CoordinatorProcess]


def launch_coordinator(
    tmp_path: Path,
    count: int = 1,
    *,
    db: str | Path | None = None,
    config_text: str | None = None,
    port: int = 0,
    extra_args: list[str] | tuple[str, ...] = (),
) -> CoordinatorProcess:
    """Start `swarm coordinator` on 127.0.0.1 and wait until it listens (files named after `count`).

    The caller stops or kills it (the `coordinator_proc` fixture does at teardown).
    """
    cmd = [sys.executable, "-m", "swarm.cli.main", "coordinator", "--host", "127.0.0.1", "--port", str(port)]
    if db is not None:
        cmd += ["--db", str(db)]
    if config_text is not None:
        config_path = tmp_path / f"coordinator-{count}.toml"
        config_path.write_text(config_text)
        cmd += ["--config", str(config_path)]
    cmd += list(extra_args)
    stderr_path = tmp_path / f"coordinator-{count}.stderr"
    # stderr goes to a file (no pipe to fill up); stdout is a pipe read right away. The coordinator
    # prints only its `listening` line there, so the undrained rest of the pipe cannot block it.
    err = open(stderr_path, "wb")  # noqa: SIM115 - closed by the process object
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    assert proc.stdout is not None
    handle = CoordinatorProcess(proc, "", 0, stderr_path, [err, proc.stdout])
    try:
        handle.host, handle.port = _wait_listening(proc, stderr_path)
    except BaseException:
        handle.kill()
        raise
    return handle


@pytest.fixture
def coordinator_proc(tmp_path: Path) -> Iterator[StartCoordinator]:
    """Factory: start `swarm coordinator` as a subprocess on 127.0.0.1 and wait until it listens.

    Call it as `coordinator_proc(db=..., config_text=..., port=0, extra_args=[...])`;
    `config_text` is TOML written to a file under tmp_path and passed as --config.
    Every process it started is SIGKILLed at teardown if it is still running.
    """
    started: list[CoordinatorProcess] = []

    def start(
        *,
        db: str | Path | None = None,
        config_text: str | None = None,
        port: int = 0,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> CoordinatorProcess:
        handle = launch_coordinator(tmp_path, len(started) + 1, db=db, config_text=config_text, port=port,
                                    extra_args=extra_args)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            handle.kill()
        handle._close_files()


# ------------------------------------------------------------------ in-process


StartServer = Callable[..., Awaitable[coordinator_server.RunningServer]]


@pytest.fixture
async def server_factory() -> AsyncIterator[StartServer]:
    """Factory: start an in-process coordinator on 127.0.0.1:0 with FAST_CONFIG plus overrides."""
    running: list[coordinator_server.RunningServer] = []

    async def start(**overrides: Any) -> coordinator_server.RunningServer:
        config = CoordinatorConfig(**{**FAST_CONFIG, **overrides})
        srv = await coordinator_server.start(config, MemoryStore(config.run_id), "127.0.0.1", 0)
        running.append(srv)
        return srv

    yield start
    for srv in running:
        await srv.stop(grace_s=0.1)


@pytest.fixture
async def server(server_factory: StartServer) -> coordinator_server.RunningServer:
    """An in-process coordinator with FAST_CONFIG, stopped after the test."""
    return await server_factory()


MakeClient = Callable[..., CoordinatorClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Factory: `make_client(server_or_target, peer_id, **client_config)` -> a CoordinatorClient.

    The run id defaults to the in-process server's run; every client is closed at teardown.
    """
    clients: list[CoordinatorClient] = []

    def make(
        target: coordinator_server.RunningServer | str,
        peer_id: str = "",
        *,
        incarnation: str | None = None,
        **config: Any,
    ) -> CoordinatorClient:
        if isinstance(target, coordinator_server.RunningServer):
            config.setdefault("run_id", target.core.config.run_id)
            target = f"127.0.0.1:{target.port}"
        config.setdefault("rpc_timeout_s", 5.0)
        config.setdefault("retry_for_s", 5.0)
        client = CoordinatorClient(ClientConfig(target=target, peer_id=peer_id, **config), incarnation=incarnation)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
