#!/usr/bin/env python
"""A WAN lab on one machine: N network namespaces on a bridge, each host's egress shaped.

    host i = namespace swarmlab-<pid>-<i>, interface eth0 = 10.77.0.(i+1)/24
    eth0 <-veth-> swl<pid>h<i> (root namespace) -- bridge swlb<pid> -- ... other hosts
    egress of each eth0: tc tbf rate <rate_mbit>mbit (the host's upload link)

Everything stays inside namespaces this process created, on a private subnet,
with no address in the root namespace: no traffic leaves the machine. The lab is
torn down on exit, on errors, on Ctrl-C and on SIGTERM; `--cleanup` removes labs
left by processes that died by SIGKILL.

Latency: the kernel here has no netem qdisc, so the lab shapes bandwidth only.
Latency (and loss) is injected in-process through the transport's fault seam
(`FaultRule(action="delay", ...)` in swarm/transport/faults.py) instead.

Needs root and `ip`/`tc` from iproute2 (`apt-get install -y iproute2`).

Usage:
    .venv/bin/python scripts/wanlab.py --hosts 3 --rate-mbit 100 --check
    .venv/bin/python scripts/wanlab.py --cleanup

As a library (workers started with multiprocessing can join a host with
`enter_netns(lab.netns(i))` before opening any socket):

    with WanLab(4, rate_mbit=1000) as lab:
        proc = lab.exec(1, [sys.executable, "-m", "http.server", "--bind", lab.ip(1)])
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/var/run/netns")
_PREFIX = "swarmlab-"
_IF_NAME = "eth0"
"""Name of each host's interface inside its namespace (GLOO_SOCKET_IFNAME=eth0 works on every host)."""


def _run(argv: list[str], timeout_s: float = 10.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout_s)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def enter_netns(name: str) -> None:
    """Move the calling thread (do it first thing in a fresh process) into network namespace `name`.

    Threads started afterwards inherit it. Sockets opened before stay where they were.

    Raises:
        OSError: setns failed (not root, or the namespace does not exist).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(_NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class WanLab:
    """N hosts (network namespaces) on one bridge, each host's egress shaped to `rate_mbit`.

    Args:
        n_hosts: number of hosts (2..250).
        rate_mbit: egress rate of every host in Mbit/s (tc tbf); 0 leaves links unshaped.
        subnet: private IPv4 subnet for the hosts; host i gets the (i+1)-th address.
        burst_ms: tbf bucket size as milliseconds of line rate (at least 32 KiB).
        queue_ms: tbf queue limit as milliseconds of line rate.
    """

    def __init__(self, n_hosts: int, rate_mbit: float, subnet: str = "10.77.0.0/24", *,
                 burst_ms: float = 4.0, queue_ms: float = 50.0) -> None:
        net = ipaddress.ip_network(subnet)
        if not net.is_private or net.version != 4:
            raise ValueError(f"subnet {subnet} must be a private IPv4 range (e.g. 10.77.0.0/24)")
        if not 2 <= n_hosts <= min(250, net.num_addresses - 2):
            raise ValueError(f"n_hosts={n_hosts} must be between 2 and {min(250, net.num_addresses - 2)} for {subnet}")
        if rate_mbit < 0:
            raise ValueError("rate_mbit must be >= 0 (0: unshaped)")
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.net = net
        self.burst_ms = burst_ms
        self.queue_ms = queue_ms
        pid = os.getpid()
        self.bridge = f"swlb{pid}"
        self._hosts = [f"{_PREFIX}{pid}-{i}" for i in range(n_hosts)]
        self._veths = [f"swl{pid}h{i}" for i in range(n_hosts)]
        if max(len(n) for n in [self.bridge, *self._veths, *(v + "p" for v in self._veths)]) > 15:
            raise ValueError("interface names exceed 15 characters (pid too large)")
        self._procs: list[subprocess.Popen[Any]] = []
        self._old_handlers: dict[int, Any] = {}
        self._up = False

    # ------------------------------------------------------------ addressing

    def netns(self, i: int) -> str:
        """Namespace name of host i."""
        return self._hosts[i]

    def ip(self, i: int) -> str:
        """IPv4 address of host i."""
        return str(self.net.network_address + i + 1)

    @property
    def ifname(self) -> str:
        """Interface name inside every host (for GLOO_SOCKET_IFNAME and the like)."""
        return _IF_NAME

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Unwind through __exit__ so the namespaces and the bridge go away.
        raise SystemExit(128 + signum)

    def _build(self) -> None:
        self._up = True
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "up"])
        prefix = self.net.prefixlen
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(32 << 10, int(rate_bytes * self.burst_ms / 1000))
        for i, (ns, veth) in enumerate(zip(self._hosts, self._veths)):
            inner = veth + "p"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", inner])
            _run(["ip", "link", "set", inner, "netns", ns])
            _run(["ip", "link", "set", veth, "master", self.bridge])
            _run(["ip", "link", "set", veth, "up"])
            nsx = ["ip", "-n", ns]
            _run([*nsx, "link", "set", inner, "name", _IF_NAME])
            _run([*nsx, "addr", "add", f"{self.ip(i)}/{prefix}", "dev", _IF_NAME])
            _run([*nsx, "link", "set", _IF_NAME, "up"])
            _run([*nsx, "link", "set", "lo", "up"])
            if self.rate_mbit > 0:
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", _IF_NAME, "root", "tbf",
                      "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", f"{self.queue_ms}ms"])

    def close(self) -> None:
        """Stop processes started with `exec`, delete the namespaces and the bridge (idempotent)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        if self._up:
            for ns in self._hosts:  # deleting a namespace deletes its veth end and with it the pair
                _run(["ip", "netns", "del", ns], check=False)
            _run(["ip", "link", "del", self.bridge], check=False)
            for veth in self._veths:  # only left if a namespace was never created
                if Path(f"/sys/class/net/{veth}").exists():
                    _run(["ip", "link", "del", veth], check=False)
            self._up = False
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # -------------------------------------------------------------- commands

    def exec(self, i: int, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside host i (`ip netns exec`); killed at teardown if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self._hosts[i], *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def tx_bytes(self, i: int) -> int:
        """Bytes host i has sent on its interface (wire bytes: payload plus TCP/IP headers)."""
        out = _run(["ip", "-n", self._hosts[i], "-s", "-j", "link", "show", _IF_NAME]).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def cleanup_stale() -> list[str]:
    """Delete labs whose creating process is gone; returns what was removed."""
    removed = []
    names = [p.name for p in _NETNS_DIR.glob(f"{_PREFIX}*")] if _NETNS_DIR.exists() else []
    links = [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("swl")]
    pids = {n.removeprefix(_PREFIX).split("-")[0] for n in names}
    pids |= {n.removeprefix("swlb") for n in links if n.startswith("swlb")}
    for pid in pids:
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        for ns in [n for n in names if n.startswith(f"{_PREFIX}{pid}-")]:
            # Processes the dead lab started inside its hosts keep a namespace alive: end them first.
            for proc_pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc_pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
        for link in [n for n in links if n == f"swlb{pid}" or n.startswith(f"swl{pid}h")]:
            _run(["ip", "link", "del", link], check=False)
            removed.append(link)
    return removed


# ------------------------------------------------------------------- check

_RECEIVER = r"""
import socket, sys, time
srv = socket.create_server((sys.argv[1], 0)); srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(float(sys.argv[2]))
buf = bytearray(1 << 20); got = 0; t0 = None
while True:
    n = conn.recv_into(buf)
    if not n: break
    if t0 is None: t0 = time.perf_counter()
    got += n
print(got, time.perf_counter() - t0, flush=True)
"""

_SENDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
buf = b"\0" * (1 << 20); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end: s.sendall(buf)
s.close()
"""

_LISTENER = r"""
import socket, sys
s = socket.create_server((sys.argv[1], 0)); s.settimeout(10)
print(s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])): s.accept()[0].close()
"""

_CONNECT = r"""
import socket, sys, time
t = time.perf_counter(); socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
print((time.perf_counter() - t) * 1e3)
"""


def check(lab: WanLab, seconds: float = 3.0) -> dict[str, Any]:
    """Connectivity between every pair (TCP connect) and throughput host 0 -> host 1."""
    timeout_s = seconds + 20
    py = sys.executable
    reach: dict[str, float | str] = {}
    for j in range(lab.n_hosts):
        listener = lab.exec(j, [py, "-c", _LISTENER, lab.ip(j), str(lab.n_hosts - 1)],
                            stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        port = listener.stdout.readline().strip()
        for i in range(lab.n_hosts):
            if i == j:
                continue
            res = subprocess.run(["ip", "netns", "exec", lab.netns(i), py, "-c", _CONNECT, lab.ip(j), port],
                                 check=False, capture_output=True, text=True, timeout=15)
            reach[f"{i}->{j}"] = round(float(res.stdout), 3) if res.returncode == 0 else res.stderr.strip()[-200:]
        listener.wait(timeout=15)
    recv = lab.exec(1, [py, "-c", _RECEIVER, lab.ip(1), str(timeout_s)], stdout=subprocess.PIPE, text=True)
    assert recv.stdout is not None
    port = recv.stdout.readline().strip()
    send = lab.exec(0, [py, "-c", _SENDER, lab.ip(1), port, str(seconds), str(timeout_s)])
    send.wait(timeout=timeout_s)
    got, elapsed = recv.stdout.readline().split()
    recv.wait(timeout=timeout_s)
    mbit = int(got) * 8 / float(elapsed) / 1e6
    return {
        "hosts": lab.n_hosts,
        "ips": [lab.ip(i) for i in range(lab.n_hosts)],
        "rate_mbit": lab.rate_mbit,
        "connect_ms": reach,
        "all_reachable": all(isinstance(v, float) for v in reach.values()),
        "throughput_0_to_1_mbit": round(mbit, 1),
        "throughput_vs_rate": round(mbit / lab.rate_mbit, 3) if lab.rate_mbit else None,
        "latency": "not shaped: no netem in this kernel; inject delay with FaultRule(action='delay')",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--subnet", default="10.77.0.0/24")
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput test length")
    ap.add_argument("--check", action="store_true", help="build, test connectivity and throughput, tear down")
    ap.add_argument("--cleanup", action="store_true", help="remove labs left by dead processes")
    args = ap.parse_args()
    if args.cleanup:
        print(json.dumps({"removed": cleanup_stale()}))
        return 0
    if not args.check:
        ap.error("nothing to do: pass --check or --cleanup")
    with WanLab(args.hosts, args.rate_mbit, args.subnet) as lab:
        print(json.dumps(check(lab, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
