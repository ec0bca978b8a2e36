"""The processes of a chaos run (scripts/chaos.py) and where they run: loopback or the WAN lab.

Every child runs in its own session (so its process group is its pid and one `killpg` takes it and anything
it started), gets SIGTERM if the harness dies however it dies (`swarm.utils.dies_with_parent`), and writes
stdout and stderr to files of its own in the run's folder: nothing is held in pipes that could fill up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from swarm.security import COORDINATOR, init_ca, issue
from swarm.utils import dies_with_parent

RUN_ID = "chaos"
LAB_PORT = 7000
"""The coordinator's port inside the lab (host 0 is its own network namespace: nothing else is there)."""
STATUS_NAME = "chaos"


@dataclass
class Child:
    """One process the harness started: a coordinator or a peer (one incarnation of a peer id)."""

    name: str
    """Peer id, or `coordinator`."""
    incarnation: int
    host: int
    proc: subprocess.Popen[bytes]
    log: Path
    out: Path
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    killed: bool = False
    """SIGKILLed by the harness (a fault, or a stop that timed out)."""
    terminated: bool = False
    """SIGTERMed by the harness at the end."""
    stopped: bool = False
    """SIGSTOPped right now."""
    files: list[IO[bytes]] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}.{self.incarnation}"

    def alive(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.ended_at is None:
            self.ended_at = time.time()
            for f in self.files:
                f.close()
        return False

    def send(self, sig: int) -> None:
        """Signal the process itself (its group for SIGKILL: nothing it started survives it)."""
        if self.proc.poll() is not None:
            return  # reaped: its pid may belong to another process now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> bool:
        """Whether it ended within `timeout_s`."""
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return False
        self.alive()
        return True

    def report(self) -> dict[str, Any] | None:
        """The peer's last `peer_report` JSON line on stdout, if it printed one."""
        found = None
        with contextlib.suppress(OSError):
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith('{"peer_report"'):
                    with contextlib.suppress(ValueError):
                        found = json.loads(line)["peer_report"]
        return found


_ERROR = re.compile(r"(^swarm \w+: )|(^\w*(Error|Exception)\b)|( (ERROR|CRITICAL) )")


def why_ended(log: Path) -> str:
    """The line of a child's log that best says why it ended: its last error-like line, else its last line."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError as e:
        return f"(no log: {e.strerror})"
    errors = [x for x in lines if _ERROR.search(x)]
    return (errors or lines or ["(empty log)"])[-1][:400]


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so no outgoing connection or port-0 listener of
    a peer can take it while the coordinator is down between a SIGKILL and its restart."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1025, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


@dataclass(frozen=True, slots=True)
class LabSpec:
    """`--lab rate=MBIT,delay=MS,jitter=MS,nat=K`: the WAN lab a run uses."""

    rate_mbit: float = 100.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    nat: int = 1

    @staticmethod
    def parse(text: str) -> LabSpec:
        """Raises: ValueError naming the bad key or value."""
        keys = {"rate": "rate_mbit", "delay": "delay_ms", "jitter": "jitter_ms", "nat": "nat"}
        values: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise ValueError(f"--lab {text!r}: {item!r} is not KEY=VALUE with KEY in {', '.join(keys)}")
            try:
                values[keys[key]] = float(value)
            except ValueError:
                raise ValueError(f"--lab {text!r}: {key}={value!r} is not a number") from None
        spec = LabSpec(**{k: int(v) if k == "nat" else v for k, v in values.items()})  # type: ignore[arg-type]
        if spec.rate_mbit < 0 or spec.delay_ms < 0 or not 0 <= spec.jitter_ms <= spec.delay_ms or spec.nat < 0:
            raise ValueError(f"--lab {text!r}: rate, delay and nat must be >= 0, and 0 <= jitter <= delay")
        return spec


class Net:
    """Where the processes run: every one on loopback (`lab` None) or host i of a WAN lab (host 0: coordinator)."""

    def __init__(self, out: Path, lab: Any = None, peer_hosts: int = 0) -> None:
        self.out = out
        self.lab = lab
        self.peer_hosts = peer_hosts
        """Lab hosts 1..peer_hosts run peers."""
        self.keys: Path | None = None
        self.coordinator_host = lab.ip(0) if lab is not None else "127.0.0.1"
        self.port = LAB_PORT if lab is not None else free_port()
        if lab is not None:  # off loopback the coordinator needs mutual TLS (or --insecure): use it, as for real
            self.keys = out / "keys"
            init_ca(self.keys, RUN_ID)
            for name in (COORDINATOR, STATUS_NAME):
                issue(self.keys, name)

    @property
    def target(self) -> str:
        return f"{self.coordinator_host}:{self.port}"

    def tls(self, name: str) -> list[str]:
        """`--tls-dir` for a process with certificate `name` (issued on first use), or nothing on loopback."""
        if self.keys is None:
            return []
        if not (self.keys / f"{name}.crt").exists():
            issue(self.keys, name)
        return ["--tls-dir", str(self.keys)]

    def peer_net_args(self) -> list[str]:
        """A lab peer listens on every interface; others dial the address its calls come from."""
        return ["--data-host", "0.0.0.0"] if self.lab is not None else []

    def spawn(self, name: str, incarnation: int, host: int, argv: list[str], hold: bool = False) -> Child:
        """Start `swarm --log-level INFO ARGV` on `host`, in its own session, logging to OUT/NAME.INCARNATION.*.

        Args:
            hold: give it a stdin pipe (a `swarm peer --hold` joins on the first line written there).
        """
        stem = self.out / f"{name}.{incarnation}"
        cmd = dies_with_parent([sys.executable, "-m", "swarm.cli.main", "--log-level", "INFO", *argv])
        out, log = open(f"{stem}.out", "wb"), open(f"{stem}.log", "wb")  # noqa: SIM115 - closed by the Child
        kw: dict[str, Any] = {"stdout": out, "stderr": log, "start_new_session": True,
                              "stdin": subprocess.PIPE if hold else subprocess.DEVNULL,
                              "env": {**os.environ, "PYTHONUNBUFFERED": "1"}}
        try:
            proc = self.lab.exec(host, cmd, **kw) if self.lab is not None else subprocess.Popen(cmd, **kw)
        except BaseException:
            out.close()
            log.close()
            raise
        return Child(name, incarnation, host, proc, Path(f"{stem}.log"), Path(f"{stem}.out"), files=[out, log])

    def cut(self, host: int) -> None:
        assert self.lab is not None
        self.lab.cut(host)

    def restore(self, host: int) -> None:
        assert self.lab is not None
        self.lab.restore(host)


def wait_listening(child: Child, timeout_s: float) -> bool:
    """Whether the coordinator printed its `listening` line within `timeout_s` (False once it exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if child.out.read_bytes().startswith(b"coordinator listening on "):
                return True
        if not child.alive():
            return False
        time.sleep(0.05)
    return False


def kill_all(children: list[Child]) -> None:
    """SIGCONT then SIGKILL every process group still running, and reap them (the last line of cleanup)."""
    for c in children:
        if c.proc.poll() is None:
            c.send(signal.SIGCONT)
            c.send(signal.SIGKILL)
    for c in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=5)
        c.alive()
