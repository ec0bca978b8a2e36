"""scripts/wanlab.py: the WAN lab's NAT routers, delayed links (TAP wires), link cuts and teardown, on real
network namespaces. Needs root; the NAT tests need nft and the delay tests /dev/net/tun (`make lab-deps`),
else they skip saying so. Every lab is torn down by its `with`, and each test checks that nothing of it
(namespace, interface, wire process) is left."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import wanlab
from wanlab import WanLab, enter_netns

T = TypeVar("T")


def _no_lab_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "the WAN lab needs root (network namespaces, bridges, tc)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "the WAN lab needs ip and tc: apt-get install -y iproute2"
    return None


NO_LAB = _no_lab_reason()
needs_lab = pytest.mark.skipif(NO_LAB is not None, reason=NO_LAB or "")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="NAT routers need nft: run `make lab-deps` (apt-get install -y nftables)")
needs_tun = pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="delayed links need /dev/net/tun (TAP)")


def _leftovers(pid: int) -> list[str]:
    """Anything a lab made by process `pid` left behind: namespaces, root-namespace interfaces, wires."""
    left = [p.name for p in Path("/var/run/netns").glob(f"swarmlab-{pid}-*")]
    left += [p.name for p in Path("/sys/class/net").iterdir() if p.name == f"swlb{pid}" or p.name.startswith(f"swl{pid}h")]
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # it just ended
            continue
        if any(a.endswith(b"lablink.py") for a in argv) and str(pid).encode() in argv:  # --parent <pid>
            left.append(f"wire process {proc.name}")
    return left


@pytest.fixture(autouse=True)
def _nothing_left() -> Iterator[None]:
    yield
    if NO_LAB is None:
        assert _leftovers(os.getpid()) == []


def in_host(lab: WanLab, i: int, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside host i's namespace (sockets it opens stay there)."""

    def run() -> T:
        enter_netns(lab.netns(i))
        return fn()

    with ThreadPoolExecutor(1) as pool:  # a new pool, so a new thread: this one never leaves the namespace
        return pool.submit(run).result()


def listen(lab: WanLab, i: int) -> socket.socket:
    srv = in_host(lab, i, lambda: socket.create_server(("0.0.0.0", 0)))
    srv.settimeout(5)
    return srv


def dial(lab: WanLab, i: int, addr: str, port: int, timeout: float) -> socket.socket:
    return in_host(lab, i, lambda: socket.create_connection((addr, port), timeout=timeout))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="listed once"):
        WanLab(3, 0, nat=[1, 1])
    with pytest.raises(ValueError, match="listed once"):
        WanLab(3, 0, nat=[3])
    with pytest.raises(ValueError, match="jitter_ms"):
        WanLab(3, 0, delay_ms=2, jitter_ms=3)
    with pytest.raises(ValueError, match="same delay_ms"):
        WanLab(3, 0, nat=[(1, 2)], delay_ms={1: 5})
    with pytest.raises(ValueError, match="private"):
        WanLab(3, 0, subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="overlaps"):
        WanLab(3, 0, lan_subnet="10.77.0.0/16")


@needs_nft
@needs_lab
def test_nat_hosts_dial_out_and_cannot_be_dialled() -> None:
    # Host 0 public; 1 and 2 share a router (one LAN); 3 has a router of its own.
    with WanLab(4, 0, nat=[(1, 2), 3]) as lab:
        assert [lab.is_nat(i) for i in range(4)] == [False, True, True, True]
        assert lab.public_ip(1) == lab.public_ip(2) != lab.public_ip(3)
        assert lab.ip(0) == lab.public_ip(0) and lab.ip(1) != lab.public_ip(1)

        srv = listen(lab, 0)
        port = srv.getsockname()[1]
        for i in (1, 2, 3):  # out through the NAT: host 0 sees the router's WAN address
            with dial(lab, i, lab.ip(0), port, timeout=3):
                conn, (src, _) = srv.accept()
                conn.close()
            assert src == lab.public_ip(i), i
        srv.close()

        srv = listen(lab, 2)  # on one LAN the hosts reach each other by private address, without NAT
        with dial(lab, 1, lab.ip(2), srv.getsockname()[1], timeout=3):
            conn, (src, _) = srv.accept()
            conn.close()
        assert src == lab.ip(1)
        srv.close()

        srv = listen(lab, 3)
        port = srv.getsockname()[1]
        with pytest.raises(OSError) as no_route:  # a private address behind a NAT: no route, fails at once
            dial(lab, 0, lab.ip(3), port, timeout=1)
        assert no_route.value.errno == errno.ENETUNREACH
        for i in (0, 1):  # the router drops unsolicited SYNs from a public host and from another NAT
            with pytest.raises(TimeoutError):
                dial(lab, i, lab.public_ip(3), port, timeout=1)
        srv.settimeout(0)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing got through
        srv.close()


@needs_tun
@needs_lab
def test_delayed_links_rtt_jitter_and_throughput_under_tbf() -> None:
    delay = {0: 10.0, 1: 10.0, 2: 5.0}
    with WanLab(3, 200, delay_ms=delay, jitter_ms={2: 4.0}) as lab:
        assert [lab.ifname == "eth0", lab.delay_ms(1)] == [True, 10.0]
        rtts = lab.rtt_ms(0, 1, n=20)
        expected = 2 * (delay[0] + delay[1])  # each frame crosses both links' wires, both ways
        assert min(rtts) >= expected
        assert statistics.median(rtts) < expected + 20, rtts

        jittered = lab.rtt_ms(0, 2, n=20)  # host 2's wire holds each frame 5 ± 4 ms each way
        assert min(jittered) >= 2 * (delay[0] + 1.0)
        assert statistics.median(jittered) < 2 * (delay[0] + 9.0) + 20, jittered
        assert max(jittered) - min(jittered) > 1.0, jittered

        mbit = lab.throughput_mbit(0, 1, seconds=2.0)  # one TCP stream through two wires and tbf at 200
        assert 40 < mbit < 200 * 1.05, mbit


@needs_lab
@pytest.mark.parametrize("link", ["veth", pytest.param("tap", marks=needs_tun), pytest.param("nat", marks=needs_nft)])
def test_cut_drops_traffic_and_restore_resumes_it(link: str) -> None:
    kw = {"veth": {}, "tap": {"delay_ms": {1: 2.0}}, "nat": {"nat": [1]}}[link]
    with WanLab(2, 0, **kw) as lab:  # type: ignore[arg-type]
        srv = listen(lab, 0)
        port = srv.getsockname()[1]
        client = dial(lab, 1, lab.ip(0), port, timeout=3)  # host 1 dials out (it may be NAT'd)
        server, _ = srv.accept()
        client.settimeout(0.5)
        server.sendall(b"a")
        assert client.recv(1) == b"a"

        lab.cut(1)
        server.sendall(b"b")
        with pytest.raises(TimeoutError):
            client.recv(1)
        with pytest.raises(OSError):
            dial(lab, 1, lab.ip(0), port, timeout=1)

        lab.restore(1)
        client.settimeout(8)  # the next retransmission of b gets through
        assert client.recv(1) == b"b"
        with dial(lab, 1, lab.ip(0), port, timeout=3):
            srv.accept()[0].close()
        for s in (client, server, srv):
            s.close()


_ORPHAN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from wanlab import WanLab
lab = WanLab(3, 10, delay_ms={0: 1.0}, nat=[2]).__enter__()
print("up", flush=True)
time.sleep(60)
"""


@needs_nft
@needs_tun
@needs_lab
def test_cleanup_removes_a_lab_whose_process_was_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(REPO / "scripts")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up", proc.stderr.read() if proc.stderr else ""
        assert len([n for n in _leftovers(proc.pid) if n.startswith("swarmlab-")]) == 4  # 3 hosts and a router
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5  # the wire sees its parent gone within 0.5 s and exits, taking its TAPs
        while any(n.startswith("wire") for n in _leftovers(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(n.startswith("wire") for n in _leftovers(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        removed = wanlab.cleanup_stale()
    assert f"swarmlab-{proc.pid}-r2" in removed and f"swlb{proc.pid}" in removed
    assert _leftovers(proc.pid) == []
