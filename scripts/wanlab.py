#!/usr/bin/env python
"""A WAN lab on one machine: hosts in network namespaces on a bridge, with shaped, delayed, NAT'd links.

    host i = namespace swarmlab-<pid>-<i>, interface eth0 (GLOO_SOCKET_IFNAME=eth0 works everywhere)
    public host i:  eth0 = 10.77.0.(i+1)/24, its link: eth0 <-> swl<pid>h<i> -- bridge swlb<pid>
    NAT'd host i:   eth0 = 10.78.k.(2+m)/24, default route via its router swarmlab-<pid>-r<i0>, whose
                    eth0 (WAN) = 10.77.0.(i0+1) is on the bridge, lan0 (LAN bridge) = 10.78.k.1/24
    link (host's, or router's WAN leg): a veth pair, or with a delay a TAP pair joined by a wire process
    egress of the link's eth0: tc tbf rate <rate_mbit>mbit (the host's or the home's upload)

NAT (`nat=[2, 3]`: hosts 2 and 3 each behind their own router; `nat=[(2, 3)]`: both behind one shared
router, in the slot of its lowest host (2); they reach each other on the LAN by private address). The router
masquerades what leaves its WAN leg (Linux conntrack NAT: the source port is kept when free, filtering
is per connection: a port-restricted cone NAT) and drops everything unsolicited that arrives on it:
only established/related return traffic reaches the LAN, so a public host (or another NAT'd host) cannot
dial a NAT'd host, neither at its private address (no route: fails at once) nor at its router's
(`lab.public_ip(i)`: the SYN is dropped, the dial times out). `lab.ip(i)` is the host's own address (bind
to it), `lab.public_ip(i)` the one others see as the source of its connections. Needs nft (nftables).

Latency: the kernel here has no netem qdisc. A link with `delay_ms` is a pair of TAP devices (one is the
host's eth0) joined by a process (scripts/lablink.py, whose docstring has its measured accuracy and
ceiling) that holds every frame delay_ms ± jitter_ms in each direction. delay_ms is per link, one way:
i -> j takes delay(i) + delay(j), so RTT = 2 (delay(i) + delay(j)) (measured: + 0.5-0.9 ms). A NAT'd
host's delay and rate are those of its router's WAN leg (shared by the router's hosts: they must agree).
One TCP stream moves at most its window (tcp_wmem max: 4 MiB) per RTT, ~250 Mbit/s at 80 ms: use several.
(In-process delay and loss through the transport's fault seam, swarm/transport/faults.py, need no root.)

Chaos: `lab.cut(i)` takes host i's link down (a public host's bridge port; a NAT'd host's port on its
router's LAN): frames are silently lost both ways, dials time out, open TCP connections stall and resume
after `lab.restore(i)`.

Everything stays inside namespaces this process created, on private subnets, with no address in the root
namespace: no traffic leaves the machine. The lab is torn down on exit, on errors, on Ctrl-C and on
SIGTERM; wire processes die with it; `--cleanup` removes labs left by processes that died by SIGKILL.

Needs root, `ip`/`tc` (iproute2) and, for NAT, `nft`: `make lab-deps` (apt-get install -y iproute2 nftables).

Usage:
    .venv/bin/python scripts/wanlab.py --hosts 3 --rate-mbit 100 --check
    .venv/bin/python scripts/wanlab.py --hosts 3 --rate-mbit 0 --delay-ms 10 --nat 2 --streams 4 --check
    .venv/bin/python scripts/wanlab.py --cleanup

As a library (workers started with multiprocessing can join a host with
`enter_netns(lab.netns(i))` before opening any socket):

    with WanLab(4, rate_mbit=1000, delay_ms=20, nat=[3]) as lab:
        proc = lab.exec(1, [sys.executable, "-m", "http.server", "--bind", lab.ip(1)])
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lablink
from lablink import Wire, enter_netns

BURST_MS = 4.0
"""Default tbf bucket of a link, as milliseconds of its rate."""
QUEUE_MS = 50.0
"""Default tbf queue limit of a link, as milliseconds of its rate (a router's buffer)."""

__all__ = ["WanLab", "check", "cleanup_stale", "enter_netns"]  # enter_netns: workers join a host with it

_NETNS_DIR = Path("/var/run/netns")
_PREFIX = "swarmlab-"
_IF_NAME = "eth0"
"""Name of each host's interface inside its namespace (GLOO_SOCKET_IFNAME=eth0 works on every host)."""
_LAN_IF = "lan0"
"""The LAN bridge inside a NAT router; each of its hosts' links is a port `lanh<i>` on it."""
_TAP_QLEN = 10000
"""Frames a TAP queues for the wire process: enough to ride out a scheduling hiccup at 1 Gbit/s."""

_ROUTER_RULES = """
table ip swarmlab_nat {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; oifname "eth0" masquerade; }
}
table inet swarmlab_filter {
    chain input { type filter hook input priority filter; policy drop;
        ct state established,related accept; iifname != "eth0" accept; }
    chain forward { type filter hook forward priority filter; policy drop;
        ct state established,related accept; iifname != "eth0" accept; }
}
"""
"""A home router: masquerade out of the WAN leg (eth0); from it, only return traffic of LAN-initiated flows."""


def _run(argv: list[str], timeout_s: float = 10.0, check: bool = True,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout_s, input=stdin)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


@dataclass
class _Site:
    """What sits on the bridge: a public host, or a NAT router with its LAN."""

    ns: str
    port: str  # its bridge port in the root namespace
    addr: str  # its address on the bridge
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    hosts: tuple[int, ...] = ()  # behind this router; () for a public host
    lan: ipaddress.IPv4Network | None = None
    wire: Wire | None = field(default=None, repr=False)


def _per_host(value: float | Mapping[int, float], n: int, what: str) -> list[float]:
    vals = [float(value.get(i, 0.0)) for i in range(n)] if isinstance(value, Mapping) else [float(value)] * n
    if isinstance(value, Mapping) and not set(value) <= set(range(n)):
        raise ValueError(f"{what}: hosts {sorted(set(value) - set(range(n)))} do not exist")
    if any(v < 0 for v in vals):
        raise ValueError(f"{what} must be >= 0")
    return vals


class WanLab:
    """N hosts (network namespaces) on one bridge; links shaped to `rate_mbit`, optionally delayed and NAT'd.

    Args:
        n_hosts: number of hosts (2..250).
        rate_mbit: egress rate of every link in Mbit/s (tc tbf); 0 leaves links unshaped.
        subnet: private IPv4 subnet of the bridge; host i's slot is its (i+1)-th address.
        burst_ms: tbf bucket size as milliseconds of line rate (at least 32 KiB).
        queue_ms: tbf queue limit as milliseconds of line rate.
        delay_ms: one-way delay of each link, in each direction: one value for all, or {host: ms}.
        jitter_ms: uniform ± around delay_ms per frame (FIFO kept), like delay_ms; needs delay_ms >= jitter_ms.
        nat: hosts behind NAT routers: an int is a host with a router of its own, a tuple of ints hosts that
            share one router (on one LAN). Each router takes the bridge slot of its lowest host.
        lan_subnet: private range the routers' LANs (/24 each) are carved from.
    """

    def __init__(self, n_hosts: int, rate_mbit: float, subnet: str = "10.77.0.0/24", *,
                 burst_ms: float = BURST_MS, queue_ms: float = QUEUE_MS,
                 delay_ms: float | Mapping[int, float] = 0.0, jitter_ms: float | Mapping[int, float] = 0.0,
                 nat: Iterable[int | Iterable[int]] = (), lan_subnet: str = "10.78.0.0/16") -> None:
        net = ipaddress.ip_network(subnet)
        lans = ipaddress.ip_network(lan_subnet)
        for s in (net, lans):
            if not s.is_private or s.version != 4:
                raise ValueError(f"subnet {s} must be a private IPv4 range (e.g. 10.77.0.0/24)")
        if net.overlaps(lans):
            raise ValueError(f"subnet {net} overlaps lan_subnet {lans}")
        if not 2 <= n_hosts <= min(250, net.num_addresses - 2):
            raise ValueError(f"n_hosts={n_hosts} must be between 2 and {min(250, net.num_addresses - 2)} for {subnet}")
        if rate_mbit < 0:
            raise ValueError("rate_mbit must be >= 0 (0: unshaped)")
        delays = _per_host(delay_ms, n_hosts, "delay_ms")
        jitters = _per_host(jitter_ms, n_hosts, "jitter_ms")
        if any(j > d for d, j in zip(delays, jitters)):
            raise ValueError("jitter_ms must not exceed delay_ms on any host")
        nat = list(nat)
        groups = [(g,) if isinstance(g, int) else tuple(sorted(g)) for g in nat]
        flat = [h for g in groups for h in g]
        if len(flat) != len(set(flat)) or not set(flat) <= set(range(n_hosts)) or not all(groups):
            raise ValueError(f"nat={list(nat)}: each NAT'd host must exist and be listed once")
        if lans.prefixlen > 24 or len(groups) > 2 ** (24 - lans.prefixlen) or any(len(g) > 250 for g in groups):
            raise ValueError(f"lan_subnet {lans} has too few /24s for {len(groups)} routers")
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.net = net
        self.burst_ms = burst_ms
        self.queue_ms = queue_ms
        pid = os.getpid()
        self.bridge = f"swlb{pid}"
        self._hosts = [f"{_PREFIX}{pid}-{i}" for i in range(n_hosts)]
        self._site_of: list[int] = [0] * n_hosts
        self.sites: list[_Site] = []
        router_of = {h: g for g in groups for h in g}
        lan_nets = lans.subnets(new_prefix=24)
        for i in range(n_hosts):
            group = router_of.get(i)
            if group is not None and group[0] != i:
                self._site_of[i] = self._site_of[group[0]]
                continue
            members = group or ()
            if len({(delays[h], jitters[h]) for h in members}) > 1:
                raise ValueError(f"hosts {members} share a router: give them the same delay_ms and jitter_ms")
            self._site_of[i] = len(self.sites)
            self.sites.append(_Site(ns=f"{_PREFIX}{pid}-r{i}" if members else self._hosts[i], port=f"swl{pid}h{i}",
                                    addr=str(net.network_address + i + 1), delay_ms=delays[i], jitter_ms=jitters[i],
                                    hosts=members, lan=next(lan_nets) if members else None))
        if max(len(n) for n in [self.bridge, *(s.port for s in self.sites)]) > 15:
            raise ValueError("interface names exceed 15 characters (pid too large)")
        self._procs: list[subprocess.Popen[Any]] = []
        self._old_handlers: dict[int, Any] = {}
        self._up = False

    # ------------------------------------------------------------ addressing

    def netns(self, i: int) -> str:
        """Namespace name of host i."""
        return self._hosts[i]

    def ip(self, i: int) -> str:
        """IPv4 address of host i itself (a private LAN address for a NAT'd host): bind to this one."""
        site = self.sites[self._site_of[i]]
        if site.lan is None:
            return site.addr
        return str(site.lan.network_address + 2 + site.hosts.index(i))

    def public_ip(self, i: int) -> str:
        """The address others see host i's connections come from (its router's WAN address if NAT'd)."""
        return self.sites[self._site_of[i]].addr

    def is_nat(self, i: int) -> bool:
        """Whether host i sits behind a NAT router."""
        return self.sites[self._site_of[i]].lan is not None

    def router_netns(self, i: int) -> str | None:
        """Namespace of host i's NAT router (None for a public host)."""
        site = self.sites[self._site_of[i]]
        return site.ns if site.lan is not None else None

    def dial_addr(self, i: int, j: int) -> str | None:
        """The address host i dials to reach host j, or None if it cannot (j is NAT'd on another LAN)."""
        if not self.is_nat(j) or self._site_of[i] == self._site_of[j]:
            return self.ip(j)
        return None

    def delay_ms(self, i: int) -> float:
        """One-way delay of host i's link (its router's WAN leg if NAT'd); RTT i<->j = 2 (d_i + d_j)."""
        return self.sites[self._site_of[i]].delay_ms

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
        if any(s.lan for s in self.sites) and shutil.which("nft") is None:
            raise RuntimeError("NAT routers need nft: apt-get install -y nftables (or `make lab-deps`)")
        self._up = True
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "up"])
        for site in self.sites:
            self._build_site(site)
            if site.lan is not None:
                self._build_router(site)

    def _build_site(self, site: _Site) -> None:
        """The namespace on the bridge and its link: veth, or two TAPs and a wire when delayed."""
        ns, nsx = site.ns, ["ip", "-n", site.ns]
        _run(["ip", "netns", "add", ns])
        if site.delay_ms > 0:
            site.wire = Wire.start(ns, _IF_NAME, site.port, site.delay_ms, site.jitter_ms)
            _run(["ip", "link", "set", site.port, "txqueuelen", str(_TAP_QLEN)])
            _run([*nsx, "link", "set", _IF_NAME, "txqueuelen", str(_TAP_QLEN)])
        else:
            _run(["ip", "link", "add", site.port, "type", "veth", "peer", "name", _IF_NAME, "netns", ns])
        _run(["ip", "link", "set", site.port, "master", self.bridge])
        _run(["ip", "link", "set", site.port, "up"])
        _run([*nsx, "addr", "add", f"{site.addr}/{self.net.prefixlen}", "dev", _IF_NAME])
        _run([*nsx, "link", "set", _IF_NAME, "up"])
        _run([*nsx, "link", "set", "lo", "up"])
        if self.rate_mbit > 0:
            burst = max(32 << 10, int(self.rate_mbit * 1e6 / 8 * self.burst_ms / 1000))
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", _IF_NAME, "root", "tbf",
                  "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", f"{self.queue_ms}ms"])

    def _build_router(self, site: _Site) -> None:
        """The router's LAN bridge, its hosts' namespaces and links to it, forwarding and the NAT rules."""
        assert site.lan is not None
        r, rx = site.ns, ["ip", "-n", site.ns]
        gateway = str(site.lan.network_address + 1)
        _run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # Hosts on one LAN talk over its bridge unfiltered (only routed traffic meets the rules).
        _run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"], check=False)
        _run([*rx, "link", "add", _LAN_IF, "type", "bridge"])
        _run([*rx, "addr", "add", f"{gateway}/{site.lan.prefixlen}", "dev", _LAN_IF])
        _run([*rx, "link", "set", _LAN_IF, "up"])
        for h in site.hosts:
            ns, hx = self._hosts[h], ["ip", "-n", self._hosts[h]]
            _run(["ip", "netns", "add", ns])
            _run([*rx, "link", "add", f"lanh{h}", "type", "veth", "peer", "name", _IF_NAME, "netns", ns])
            _run([*rx, "link", "set", f"lanh{h}", "master", _LAN_IF])
            _run([*rx, "link", "set", f"lanh{h}", "up"])
            _run([*hx, "addr", "add", f"{self.ip(h)}/{site.lan.prefixlen}", "dev", _IF_NAME])
            _run([*hx, "link", "set", _IF_NAME, "up"])
            _run([*hx, "link", "set", "lo", "up"])
            _run([*hx, "route", "add", "default", "via", gateway])
        _run(["ip", "netns", "exec", r, "nft", "-f", "-"], stdin=_ROUTER_RULES)

    def close(self) -> None:
        """Stop processes started with `exec` and the wires, delete the namespaces and the bridge (idempotent)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        for site in self.sites:
            if site.wire is not None:  # its TAPs go with it
                site.wire.stop()
                site.wire = None
        if self._up:
            for ns in {*self._hosts, *(s.ns for s in self.sites)}:  # a namespace takes its veth ends along
                _run(["ip", "netns", "del", ns], check=False)
            _run(["ip", "link", "del", self.bridge], check=False)
            for site in self.sites:  # only left if a namespace was never created
                if Path(f"/sys/class/net/{site.port}").exists():
                    _run(["ip", "link", "del", site.port], check=False)
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

    def rtt_ms(self, i: int, j: int, n: int = 20) -> list[float]:
        """`n` UDP echo round trips (ms) from host i to host j (which i must be able to dial)."""
        return lablink.rtt_ms(self._hosts[i], self._hosts[j], self.ip(j), self._dial(i, j), n)

    def throughput_mbit(self, src: int, dst: int, seconds: float = 3.0, streams: int = 1) -> float:
        """Goodput (Mbit/s) of `streams` TCP streams from host src to host dst over `seconds`."""
        return lablink.throughput_mbit(self._hosts[src], self._hosts[dst], self.ip(dst), self._dial(src, dst),
                                       seconds, streams)

    def _dial(self, i: int, j: int) -> str:
        addr = self.dial_addr(i, j)
        if addr is None:
            raise ValueError(f"host {i} cannot dial host {j}: it is behind another NAT")
        return addr

    def _link(self, i: int) -> list[str]:
        site = self.sites[self._site_of[i]]
        return ["ip", "-n", site.ns, "link", "set", f"lanh{i}"] if site.lan else ["ip", "link", "set", site.port]

    def cut(self, i: int) -> None:
        """Take host i's link down: its frames are lost both ways (silently: dials time out) until `restore`."""
        _run([*self._link(i), "down"])

    def restore(self, i: int) -> None:
        """Bring host i's link back up after `cut`; open TCP connections resume on their next retransmission."""
        _run([*self._link(i), "up"])


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
            # Processes the dead lab started inside its hosts (wires too) keep a namespace alive: end them first.
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

_LISTENER = r"""
import socket, sys
s = socket.create_server((sys.argv[1], 0)); s.settimeout(10)
print(s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])): s.accept()[0].close()
"""

_CONNECT = r"""
import socket, sys, time
t = time.perf_counter(); socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
print((time.perf_counter() - t) * 1e3)
"""


def check(lab: WanLab, seconds: float = 3.0, streams: int = 1) -> dict[str, Any]:
    """TCP connect between every pair (NAT'd hosts must be unreachable from outside their LAN), the RTT
    and the throughput from the first host that can reach another (host 0 unless NAT'd) to it."""
    py = sys.executable
    reach: dict[str, float | str] = {}
    as_expected = True
    for j in range(lab.n_hosts):
        sources = [i for i in range(lab.n_hosts) if i != j and lab.dial_addr(i, j) is not None]
        listener = lab.exec(j, [py, "-c", _LISTENER, "0.0.0.0", str(len(sources))], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        port = listener.stdout.readline().strip()
        for i in range(lab.n_hosts):
            if i == j:
                continue
            addr = lab.dial_addr(i, j) or lab.public_ip(j)  # blocked: dial the router, which must drop it
            timeout = "1" if i not in sources else str(5 + 4 * (lab.delay_ms(i) + lab.delay_ms(j)) / 1e3)
            res = subprocess.run(["ip", "netns", "exec", lab.netns(i), py, "-c", _CONNECT, addr, port, timeout],
                                 check=False, capture_output=True, text=True, timeout=15)
            ok = res.returncode == 0
            reach[f"{i}->{j}"] = round(float(res.stdout), 3) if ok else res.stderr.strip().rpartition("\n")[2]
            as_expected &= ok == (i in sources)
        listener.wait(timeout=15)
    hosts = range(lab.n_hosts)
    src, dst = next((i, j) for i in hosts for j in hosts if i != j and lab.dial_addr(i, j) is not None)
    rtts = sorted(lab.rtt_ms(src, dst))
    mbit = lab.throughput_mbit(src, dst, seconds, streams)
    return {
        "hosts": lab.n_hosts,
        "ips": [lab.ip(i) for i in hosts],
        "public_ips": [lab.public_ip(i) for i in hosts],
        "rate_mbit": lab.rate_mbit,
        "delay_ms": [lab.delay_ms(i) for i in hosts],
        "connect_ms": reach,
        "reachability_as_expected": as_expected,
        "pair": f"{src}->{dst}",
        "rtt_expected_ms": 2 * (lab.delay_ms(src) + lab.delay_ms(dst)),
        "rtt_ms": {"min": round(rtts[0], 3), "median": round(rtts[len(rtts) // 2], 3), "max": round(rtts[-1], 3)},
        "streams": streams,
        "throughput_mbit": round(mbit, 1),
        "throughput_vs_rate": round(mbit / lab.rate_mbit, 3) if lab.rate_mbit else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--subnet", default="10.77.0.0/24")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every link (TAP wire)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± around --delay-ms")
    ap.add_argument("--nat", default="", help="NAT'd hosts: '2,3' (a router each) or '2+3' (one shared router)")
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput test length")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams in the throughput test")
    ap.add_argument("--check", action="store_true", help="build, test connectivity, RTT and throughput, tear down")
    ap.add_argument("--cleanup", action="store_true", help="remove labs left by dead processes")
    args = ap.parse_args()
    if args.cleanup:
        print(json.dumps({"removed": cleanup_stale()}))
        return 0
    if not args.check:
        ap.error("nothing to do: pass --check or --cleanup")
    nat = [tuple(int(h) for h in g.split("+")) for g in args.nat.split(",") if g]
    with WanLab(args.hosts, args.rate_mbit, args.subnet, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                nat=nat) as lab:
        print(json.dumps(check(lab, args.seconds, args.streams), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
