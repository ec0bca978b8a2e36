#!/usr/bin/env python
"""A delaying wire for the WAN lab (scripts/wanlab.py): one-way latency and jitter without netem.

The kernel here has no netem qdisc, so a host's link to the lab bridge is a pair of TAP devices joined
by this process instead of a veth pair:

    namespace NS: eth0 (TAP, fd A)  <-- this process holds both fds -->  (TAP, fd B) swl<pid>h<i>: bridge port

Every frame read from one fd is written to the other `delay_ms` (± `jitter_ms`) later, in each
direction, so a host whose link has delay d sees RTT 2·d to a host with an undelayed link, and
2·(d_i + d_j) to a host whose link has delay d_j.

Jitter is uniform in [delay - jitter, delay + jitter] per frame, but each direction stays FIFO: a frame
is never released before the one read ahead of it (release = max(previous release, arrival + delay ±
jitter)). Real paths rarely reorder and TCP treats reordering as loss; the price is that at high packet
rates the jitter bunches frames upward instead of spreading them both ways.

Speed: the TAPs are opened with IFF_VNET_HDR and TUNSETOFFLOAD (checksum, TSO, USO), so the kernel hands
this process GSO superframes of up to 64 KiB and takes them back unsegmented: Python pays per superframe,
not per 1500-byte frame. Each wakeup drains up to `_BATCH` frames per fd. Beyond `--queue-mb` held per
direction, frames are dropped, as by a full router buffer.

Measured (`WanLab(2, rate, delay_ms=d)`, both links delayed, so 4 wire passes per round trip; 2 cores
with a load average of 5-6 from other work; UDP echo RTT over 30 probes; TCP goodput over 4 s):

    d ms   tbf Mbit/s   RTT expected   RTT min / median   1 stream Mbit/s   4 streams Mbit/s
    1      -            4              4.43 / 4.54        2545-3696         3709-5483
    5      -            20             20.52 / 20.76      1037-1078         2306-3010
    20     -            80             80.72 / 80.87      243-259           988-1021
    5      1000         20             20.57 / 20.74      916-917           882-931
    1      1000         4              4.50 / 4.70        951               953
    5      100          20             20.50 / 20.68      94                95
    5, 1500-byte frames (no GSO): 384-553 / 327-606; at tbf 1000: 635-696 / 576-803

So the wire's own ceiling is several Gbit/s with GSO (0.4-0.7 Gbit/s without); a single stream at larger
delays is bound by TCP's window, not the wire; tbf rates up to 1 Gbit/s are met (0.92-0.95). The RTT sits
0.5-0.9 ms above 2 (d_i + d_j): each pass adds a wakeup and two syscalls (select's timeout has microsecond
resolution and the timer slack is set to 1 us); under load a few probes see a few ms more.

Both TAPs are non-persistent: they vanish when this process exits, taking the host's eth0 with them. The
process exits within `_PARENT_CHECK_S` of its parent (the lab's process, whichever of its threads started
it), so the TAPs go even when the lab's process dies by SIGKILL (`wanlab.py --cleanup` then removes the
namespaces; it would also end a wire still there, as it lives in the host's namespace).

Run by WanLab (`Wire.start`), not by hand: it prints `ready` once both TAPs exist, then forwards until
killed. Needs root (setns, /dev/net/tun).

Also here: probes that measure a link between two namespaces, `rtt_ms` (UDP echo) and `throughput_mbit`
(TCP goodput, one or more streams), behind `WanLab.rtt_ms` / `WanLab.throughput_mbit` and `wanlab.py --check`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
CLONE_NEWNET = 0x40000000
PR_SET_TIMERSLACK = 29

_MAX_FRAME = 65536 + 64
"""Largest read: a 64 KiB GSO superframe plus the virtio-net header and the Ethernet header."""
_PARENT_CHECK_S = 0.5
"""How often the wire looks whether the lab's process is still its parent (it exits when not)."""
_BATCH = 256
"""Frames read from one fd per wakeup before looking at the other fd and at the clock."""


def enter_netns(name: str) -> None:
    """Move the calling thread (do it first thing in a fresh process) into network namespace `name`.

    Threads started afterwards inherit it. Sockets opened before stay where they were.

    Raises:
        OSError: setns failed (not root, or the namespace does not exist).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(Path("/var/run/netns") / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(name: str, netns: str | None = None, offload: bool = True) -> int:
    """Create TAP device `name` and return its fd (non-blocking); inside `netns` if given.

    The device lives as long as the fd: it is not persistent. A TAP is created in the network
    namespace of the process that opened /dev/net/tun, so with `netns` this process moves into that
    namespace first and stays there (the caller opens its root-namespace TAPs before).
    """
    if netns is not None:
        enter_netns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        if offload:
            base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
            except OSError:  # kernels before 6.2 have no USO
                fcntl.ioctl(fd, TUNSETOFFLOAD, base)
    except BaseException:
        os.close(fd)
        raise
    return fd


def forward(fd_a: int, fd_b: int, delay_s: float, jitter_s: float, queue_bytes: int, seed: int | None = None,
            parent: int = 0) -> None:
    """Copy frames a->b and b->a, each held `delay_s` ± `jitter_s` (FIFO per direction), until process
    `parent` (if given) is no longer this process's parent."""
    rng = random.Random(seed)
    # One queue per direction: deque of (release time, frame); held[fd] counts bytes queued from fd.
    queues: dict[int, deque[tuple[float, bytes]]] = {fd_a: deque(), fd_b: deque()}
    out = {fd_a: fd_b, fd_b: fd_a}
    held = {fd_a: 0, fd_b: 0}
    last = {fd_a: 0.0, fd_b: 0.0}
    clock = time.monotonic
    next_check = clock() + _PARENT_CHECK_S
    fds = [fd_a, fd_b]
    read, write = os.read, os.write
    while True:
        now = clock()
        if now >= next_check:
            if parent and os.getppid() != parent:
                return
            next_check = now + _PARENT_CHECK_S
        wait = next_check - now
        for src, q in queues.items():
            if not q:
                continue
            dst = out[src]
            while q and q[0][0] <= now:
                frame = q.popleft()[1]
                held[src] -= len(frame)
                try:
                    write(dst, frame)
                except OSError:  # the other side is down (a cut link) or full: the frame is lost, as on a wire
                    pass
            if q:
                due = q[0][0] - now
                wait = min(wait, due)
        # select, not epoll: its timeout has microsecond resolution, epoll's whole milliseconds (rounded up).
        for src in select.select(fds, (), (), wait)[0]:
            q = queues[src]
            now = clock()
            for _ in range(_BATCH):
                try:
                    frame = read(src, _MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EIO:  # no carrier on this TAP yet
                        break
                    raise
                if held[src] + len(frame) > queue_bytes:
                    continue  # tail drop
                release = now + delay_s
                if jitter_s:
                    release += rng.uniform(-jitter_s, jitter_s)
                    release = max(release, last[src], now)
                    last[src] = release
                q.append((release, frame))
                held[src] += len(frame)


class Wire:
    """A running wire process: TAP `inner` in namespace `netns`, TAP `outer` in the caller's namespace."""

    def __init__(self, proc: subprocess.Popen[str], netns: str, inner: str, outer: str) -> None:
        self.proc, self.netns, self.inner, self.outer = proc, netns, inner, outer

    @classmethod
    def start(cls, netns: str, inner: str, outer: str, delay_ms: float, jitter_ms: float = 0.0,
              queue_mb: float = 64.0, offload: bool = True, timeout_s: float = 10.0) -> Wire:
        """Start the process and wait until both TAPs exist (they are down and unaddressed)."""
        argv = [sys.executable, str(Path(__file__).resolve()), "--netns", netns, "--inner", inner, "--outer", outer,
                "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--queue-mb", str(queue_mb),
                "--parent", str(os.getpid()), *([] if offload else ["--no-offload"])]
        # Its own session: a Ctrl-C meant for the lab's process does not cut the link under it.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            proc.kill()
            err = proc.stderr.read().strip()
            proc.wait(timeout=5)
            raise RuntimeError(f"wire {outer} <-> {netns}/{inner} did not start: {err[-500:] or line or 'timeout'}")
        return cls(proc, netns, inner, outer)

    def stop(self) -> None:
        """Kill the process; both TAPs vanish with it (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


# ------------------------------------------------------------------ probes
# Measure a link between two namespaces: each side runs as `ip netns exec NS python -c ...`.

_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0)); s.settimeout(float(sys.argv[2]))
print(s.getsockname()[1], flush=True)
while (m := s.recvfrom(64))[0] != b"bye": s.sendto(*m)
"""

_PING = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((sys.argv[1], int(sys.argv[2])))
rtts = []
for k in range(int(sys.argv[3]) + 1):  # the first one also pays for ARP: not counted
    t = time.perf_counter(); s.send(b"%d" % k)
    while s.recv(64) != b"%d" % k: pass
    rtts.append((time.perf_counter() - t) * 1e3); time.sleep(0.02)
s.send(b"bye"); print(json.dumps(rtts[1:]))
"""

_RECEIVER = r"""
import socket, sys, threading, time
srv = socket.create_server((sys.argv[1], 0)); srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
got, first, last = [], [], []
def drain(conn):
    conn.settimeout(float(sys.argv[2])); buf = bytearray(1 << 20); n = 0
    while m := conn.recv_into(buf):
        if not n: first.append(time.perf_counter())
        n += m
    got.append(n); last.append(time.perf_counter())
threads = [threading.Thread(target=drain, args=(srv.accept()[0],)) for _ in range(int(sys.argv[3]))]
for t in threads: t.start()
for t in threads: t.join()
print(sum(got), max(last) - min(first), flush=True)
"""

_SENDER = r"""
import socket, sys, threading, time
end = time.perf_counter() + float(sys.argv[3])
def send():
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
    buf = b"\0" * (1 << 20)
    while time.perf_counter() < end: s.sendall(buf)
    s.close()
threads = [threading.Thread(target=send) for _ in range(int(sys.argv[5]))]
for t in threads: t.start()
for t in threads: t.join()
"""


def _in_ns(ns: str, code: str, *args: object, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *map(str, args)],
                            stdin=subprocess.DEVNULL, text=True, **kw)


def _server(ns: str, code: str, *args: object) -> tuple[subprocess.Popen[str], str]:
    """Start a probe server; returns it and the port it printed."""
    proc = _in_ns(ns, code, *args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def rtt_ms(client_ns: str, server_ns: str, bind: str, dial: str, n: int = 20, timeout_s: float = 30.0) -> list[float]:
    """`n` UDP echo round trips (ms), one every 20 ms, from `client_ns` to a server bound to `bind` in
    `server_ns`, dialled at `dial` (the same address unless NAT is in between)."""
    server, port = _server(server_ns, _ECHO, bind, timeout_s)
    try:
        client = _in_ns(client_ns, _PING, dial, port, n, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = client.communicate(timeout=timeout_s)
        if client.returncode != 0:
            raise RuntimeError(f"UDP echo {client_ns} -> {dial} failed: {err.strip()[-300:]}")
        server.wait(timeout=timeout_s)
        return [float(x) for x in json.loads(out)]
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


def throughput_mbit(src_ns: str, dst_ns: str, bind: str, dial: str, seconds: float = 3.0, streams: int = 1) -> float:
    """Goodput (Mbit/s, first byte to last) of `streams` parallel TCP streams sending for `seconds` from
    `src_ns` to a receiver bound to `bind` in `dst_ns`, dialled at `dial`."""
    timeout_s = seconds + 20
    recv, port = _server(dst_ns, _RECEIVER, bind, timeout_s, streams)
    send = None
    try:
        send = _in_ns(src_ns, _SENDER, dial, port, seconds, timeout_s, streams)
        send.wait(timeout=timeout_s)
        assert recv.stdout is not None
        line = recv.stdout.readline().split()
        if send.returncode != 0 or len(line) != 2:
            raise RuntimeError(f"TCP transfer {src_ns} -> {dial} failed (sender exit {send.returncode})")
        return int(line[0]) * 8 / float(line[1]) / 1e6
    finally:
        for proc in (send, recv):
            if proc is not None:
                proc.kill()
                proc.wait()
        assert recv.stdout is not None
        recv.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--netns", required=True, help="namespace of the inner TAP")
    ap.add_argument("--inner", default="eth0", help="name of the TAP inside --netns")
    ap.add_argument("--outer", required=True, help="name of the TAP in this process's starting namespace")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± around --delay-ms (FIFO kept)")
    ap.add_argument("--queue-mb", type=float, default=64.0, help="bytes held per direction before tail drop")
    ap.add_argument("--parent", type=int, default=0, help="exit if this pid is not our parent (it died)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-offload", action="store_true", help="plain 1500-byte frames, no GSO (slower; for comparison)")
    args = ap.parse_args()
    if args.jitter_ms < 0 or args.delay_ms < 0:
        ap.error("--delay-ms and --jitter-ms must be >= 0")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # wake within ~1 us of a frame's due time, not the default 50 us
    if args.parent and os.getppid() != args.parent:  # it died already
        return 1
    outer = open_tap(args.outer, offload=not args.no_offload)
    inner = open_tap(args.inner, netns=args.netns, offload=not args.no_offload)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        forward(inner, outer, args.delay_ms / 1e3, args.jitter_ms / 1e3, int(args.queue_mb * (1 << 20)), args.seed,
                args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
