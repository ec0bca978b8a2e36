"""Hostile connections to a live run over mutual TLS (issue 18, the production default): random garbage,
truncated frames, length fields claiming 2**40 bytes and slow-loris connections against every peer's data
port and the coordinator's gRPC port while three real `swarm peer` processes average over the data plane.

One run serves every test here (module-scoped, about a minute). Attacks come from this process: over raw
TCP (they die in the TLS handshake) and over TLS with `mallory`, a certificate of the run, so that hostile
frames reach the frame decoder and hostile HTTP/2 reaches gRPC. Afterwards: every process lived, the run
committed every round with one state hash, no process's peak RSS grew by more than RSS_BOUND_KB, the peers
closed each hostile connection (the slow ones within `TransportConfig.io_timeout_s`, the data plane's
default: `swarm peer` has no flag for it) and logged why, and the coordinator kept answering.

The coordinator's slow connections are only checked not to slow it down: gRPC closes them after its own
defaults (a TLS handshake after 120 s, unacknowledged HTTP/2 settings after 60 s), past this run's end.
Bugs this found (call descriptions held for 600 s, an int64 shape overflow, offenders logged unnamed) are fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import msgpack
import pytest

from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import COORDINATOR, init_ca, issue, load_identity
from swarm.security.tls import CHANNEL_OPTIONS, channel_credentials
from swarm.transport.endpoint import TransportConfig
from swarm.transport.frames import MAGIC, PREFIX, VERSION, Header, checksum, encode_header
from tests.conftest import REPO, CoordinatorProcess, launch_coordinator

pytestmark = pytest.mark.slow

RUN = "hostile-run"
PEERS = ("alice", "bob", "carol")
ATTACKER = "mallory"
"""Holds a certificate of the run: its frames get past TLS to the decoders."""
OBSERVER = "observer"
ROUNDS = 24
WORK_S = 2.0
"""24 rounds of 2 s: the run outlives the slow-loris connections (closed after IO_TIMEOUT_S) by ~10 s."""
IO_TIMEOUT_S = TransportConfig().io_timeout_s
"""How long a peer waits for a connection's hello, or for the rest of a frame (not settable by `swarm peer`)."""
MAX_CALL_BYTES = TransportConfig().max_call_bytes
HUGE = 2**40
RSS_BOUND_KB = 200 * 1024
"""Peak RSS a process may gain during the attacks: a 2**40-byte claim must allocate nothing."""
CLOSE_WAIT_S = 10.0
"""How long a one-shot attack waits for the server to close its connection."""
LORIS_PER_KIND = 8
"""Slow-loris connections of each raw kind per target."""
INFLATED = "carol"
"""The peer sent INFLATE_CONNECTIONS call descriptions that inflate (the others get every other attack)."""
INFLATE_CONNECTIONS = 6
MAX_META_BYTES = 1 << 20
"""A message description's limit (swarm.transport.messages.MAX_META_BYTES)."""
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7


# ------------------------------------------------------------------ what the run leaves behind


@dataclass(slots=True)
class Outcome:
    """How one hostile connection ended."""

    target: str
    """A peer id, or `coordinator`."""
    attack: str
    closed_after_s: float | None
    """When the server closed it, from its opening (None: still open when the attacker gave up)."""
    everyone_alive: bool = True
    """Whether every process of the run was alive when it closed."""
    source: str = ""
    """The attacker's host:port."""
    note: str = ""


@dataclass(slots=True)
class HostileRun:
    """Everything the tests check, gathered by the `hostile_run` fixture."""

    codes: dict[str, int | None] = field(default_factory=dict)
    """Exit code of each process (the coordinator's after SIGTERM at the end)."""
    died_early: list[str] = field(default_factory=list)
    """Processes that exited while the attacks went on."""
    reports: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    baseline_hwm_kb: dict[str, int] = field(default_factory=dict)
    peak_hwm_kb: dict[str, int] = field(default_factory=dict)
    oneshots: list[Outcome] = field(default_factory=list)
    loris: list[Outcome] = field(default_factory=list)
    status_latency_s: list[float] = field(default_factory=list)
    status_errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ processes


def _vm_kb(pid: int, key: str) -> int | None:
    """VmHWM / VmRSS of `pid` in kB (None: gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


class Watch:
    """Samples every process's peak RSS and notices exits, every 0.2 s, on a thread of its own."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.procs = procs
        self.peak_kb: dict[str, int] = {}
        self.exited: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def all_alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for name, proc in self.procs.items():
                hwm = _vm_kb(proc.pid, "VmHWM")
                if hwm is not None:
                    self.peak_kb[name] = max(self.peak_kb.get(name, 0), hwm)
                if proc.poll() is not None:
                    self.exited.setdefault(name, time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Observer:
    """Reads the coordinator's status over mutual TLS as `observer`."""

    def __init__(self, port: int, keys: Path) -> None:
        identity = load_identity(keys, OBSERVER, run_id=RUN)
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(identity), options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def status(self) -> pb.StatusReply:
        return self.stub.GetStatus(pb.GetStatusRequest(run_id=RUN), timeout=5)

    def wait_running(self, procs: dict[str, subprocess.Popen], timeout_s: float) -> dict[str, str]:
        """Every peer's data-plane address once all are members and round 1 committed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            assert not dead, f"{dead} exited before the attacks"
            with contextlib.suppress(grpc.RpcError):
                reply = self.status()
                addresses = {m.member.peer_id: m.member.address for m in reply.members}
                if set(addresses) == set(PEERS) and any(r.phase == "committed" and r.round >= 1
                                                        for r in reply.rounds):
                    return addresses
            time.sleep(0.2)
        raise AssertionError(f"the run did not commit round 1 within {timeout_s} s")

    def current_round(self) -> int:
        return max((r.round for r in self.status().rounds), default=0)


# ------------------------------------------------------------------ attacker's tools


def _garbage(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _tls_context(keys: Path, h2: bool = False) -> ssl.SSLContext:
    """mallory's client context: a certificate of the run, verified servers, no name check (as the peers);
    `h2` offers ALPN h2, as gRPC clients do."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(keys / "ca.crt")
    ctx.load_cert_chain(keys / f"{ATTACKER}.crt", keys / f"{ATTACKER}.key")
    if h2:
        ctx.set_alpn_protocols(["h2"])
    return ctx


def _frame(header: Header, payload: bytes = b"") -> bytes:
    return encode_header(header) + payload


def _hello(sender: str = ATTACKER, run: str = RUN) -> bytes:
    return _frame(Header(kind="hello", run=run, sender=sender))


def _call(description: dict) -> bytes:
    """A `call` message's first frame: its msgpack description (arrays it announces follow in later frames)."""
    return _call_body(msgpack.packb(description, use_bin_type=True))


def _call_body(body: bytes) -> bytes:
    return _frame(Header(kind="call", run=RUN, sender=ATTACKER, total=len(body), nbytes=len(body),
                         checksum=checksum(body)), body)


def _inflating_call() -> bytes:
    """A call whose description is at its size limit and unpacks into about a million empty dicts (~75 MB)."""
    n = MAX_META_BYTES - 8
    return _hello() + _call_body(b"\x81\xa1x\xdd" + n.to_bytes(4, "big") + b"\x80" * n)


def _h2(kind: int, flags: int, stream: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """An HTTP/2 frame; `length` overrides the length field (a lie about the payload)."""
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _h2_get_status_headers() -> bytes:
    """HEADERS (END_HEADERS) opening stream 1 for GetStatus: HPACK literals without indexing or Huffman."""
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/swarm.v1.Coordinator/GetStatus"),
              (b":authority", b"coordinator"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    block = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in fields)
    return _h2(H2_HEADERS, 0x4, 1, block)


H2_OPEN = H2_PREFACE + _h2(H2_SETTINGS, 0, 0)


def _h2_replies(data: bytes) -> list[tuple[int, int]]:
    """(type, stream) of the complete HTTP/2 frames in `data` (after the server's preface, there is none)."""
    frames, at = [], 0
    while at + 9 <= len(data):
        n = int.from_bytes(data[at : at + 3], "big")
        frames.append((data[at + 3], int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF))
        at += 9 + n
    return frames


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT_S)
    return sock if ctx is None else ctx.wrap_socket(sock)


def _source(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _read_until_closed(sock: socket.socket, wait_s: float) -> tuple[bool, bytes]:
    """Read what the server sends until it closes the connection (True) or `wait_s` passes (False)."""
    sock.settimeout(0.25)
    got = b""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:  # reset, or TLS torn down without close_notify
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


Attack = Callable[[int], Outcome]
"""port -> how it ended (target left for the caller to fill in)."""


def _oneshot(name: str, send: bytes, ctx: ssl.SSLContext | None, half_close: bool = False,
             answered: Callable[[bytes], str] | None = None) -> Attack:
    """Connect (over TLS with mallory's certificate when `ctx`), send `send`, and see the server close.

    Args:
        half_close: shut our side down after sending (a truncated frame: nothing more will come).
        answered: for attacks the server may answer without closing (an HTTP/2 stream reset): what it answered
            from what it sent, '' for nothing; the connection then counts as handled.
    """

    def attack(port: int) -> Outcome:
        start = time.monotonic()
        try:
            sock = _connect(port, ctx)
        except OSError as e:  # the server may refuse the handshake itself
            return Outcome("", name, time.monotonic() - start, note=f"handshake refused: {e}")
        with sock:
            source = _source(sock)
            try:
                sock.sendall(send)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                return Outcome("", name, time.monotonic() - start, source=source, note=f"send failed: {e}")
            closed, got = _read_until_closed(sock, CLOSE_WAIT_S)
            note = answered(got) if answered is not None else ""
            end = time.monotonic() - start if closed or note else None
            return Outcome("", name, end, source=source, note=note)

    return attack


def _h2_answer(got: bytes) -> str:
    """What the coordinator said about stream 1 or the connection: RST_STREAM, HEADERS (trailers) or GOAWAY."""
    kinds = {H2_RST_STREAM: "RST_STREAM", H2_HEADERS: "HEADERS", H2_GOAWAY: "GOAWAY"}
    said = [kinds[k] for k, stream in _h2_replies(got) if k in kinds and (stream == 1 or k == H2_GOAWAY)]
    return ",".join(said)


def _peer_attacks(keys: Path, round_: int) -> list[Attack]:
    """One-shot attacks on a peer's data port. `round_`: the run's round now (hostile payloads aim at the
    rounds a peer accepts early data for, so that their size reaches the allocator's checks)."""
    tls = _tls_context(keys)
    huge_prefix = PREFIX.pack(MAGIC, VERSION, 2**32 - 1)  # the 4-byte header length at its largest
    huge_frame = _frame(Header(kind="contrib", run=RUN, sender=ATTACKER, round=round_ + 1, attempt=99,
                               total=HUGE, nbytes=HUGE))
    # 1 KiB frames of a 2**40-byte payload for rounds near the peer's: one reaches the pending-bytes check.
    huge_payload = b"".join(_frame(Header(kind="contrib", run=RUN, sender=ATTACKER, round=r, attempt=99,
                                          total=HUGE, nbytes=1024, checksum=checksum(bytes(1024))), bytes(1024))
                            for r in range(round_, round_ + 4))
    contrib = _frame(Header(kind="contrib", run=RUN, sender=ATTACKER, round=round_ + 1, attempt=99, total=4096,
                            nbytes=4096))
    return [
        _oneshot("raw: random garbage", _garbage(4096, 1), None),
        _oneshot("raw: frame claiming 2**40 bytes", huge_prefix + huge_frame, None),
        _oneshot("raw: truncated TLS record", b"\x16\x03\x01\x02", None, half_close=True),
        _oneshot("tls: random garbage", _garbage(4096, 2), tls),
        _oneshot("tls: header length 2**32-1", huge_prefix + b"\x00" * 64, tls),
        _oneshot("tls: frame of 2**40 bytes", _hello() + huge_frame, tls),
        _oneshot("tls: payload of 2**40 bytes", _hello() + huge_payload, tls),
        _oneshot("tls: call of 2**40 bytes", _hello() + _call({"arrays": [["x", "float32", [HUGE // 4]]]}), tls),
        _oneshot("tls: call whose shape overflows int64", _hello() + _call({"arrays": [["x", "uint8", [2**32, 2**32]]]}),
                 tls),
        _oneshot("tls: truncated frame", _hello() + contrib[: PREFIX.size + 5], tls, half_close=True),
        _oneshot("tls: truncated payload", _hello() + contrib + bytes(100), tls, half_close=True),
        _oneshot("tls: hello as another peer", _hello(sender="alice"), tls),
        _oneshot("tls: hello of another run", _hello(run="other-run"), tls),
    ]


def _coordinator_attacks(keys: Path) -> list[Attack]:
    """One-shot attacks on the coordinator's gRPC port."""
    tls = _tls_context(keys, h2=True)
    grpc_huge = b"\x00" + (2**32 - 1).to_bytes(4, "big") + bytes(100)  # a gRPC message of 4 GiB - 1 announced
    return [
        _oneshot("raw: random garbage", _garbage(4096, 3), None),
        _oneshot("raw: HTTP/2 without TLS", H2_OPEN + _h2_get_status_headers(), None),
        _oneshot("raw: truncated TLS record", b"\x16\x03\x01\x02", None, half_close=True),
        _oneshot("tls: random garbage", _garbage(4096, 4), tls),
        _oneshot("tls: HTTP/2 frame claiming 2**24-1 bytes", H2_OPEN + _h2(H2_DATA, 0, 1, bytes(64), 2**24 - 1),
                 tls, answered=_h2_answer),
        _oneshot("tls: gRPC message claiming 2**32-1 bytes",
                 H2_OPEN + _h2_get_status_headers() + _h2(H2_DATA, 0, 1, grpc_huge), tls,
                 answered=_h2_answer),
        _oneshot("tls: truncated HTTP/2 frame", H2_OPEN + _h2_get_status_headers()[:7], tls,
                 half_close=True),
    ]


# ------------------------------------------------------------------ slow loris


@dataclass(slots=True)
class _Slow:
    sock: socket.socket
    target: str
    attack: str
    opened: float
    drip: bytes
    """What it sends, one byte a second (empty: nothing)."""
    source: str = ""
    sent: int = 0
    closed_after_s: float | None = None
    everyone_alive: bool = True


class Loris:
    """Slow-loris connections held open by one thread: silent ones, and ones that send a byte a second.

    Call `open` first, then `start()`; `join()` returns once every connection to a peer was closed by it or
    IO_TIMEOUT_S + 8 s passed (connections to the coordinator are then closed by us: gRPC holds them longer).
    """

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.slow: list[_Slow] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def open(self, target: str, port: int, attack: str, drip: bytes = b"", ctx: ssl.SSLContext | None = None,
             first: bytes = b"") -> None:
        """Connect (TLS with `ctx`), send `first` at once, then `drip` a byte a second."""
        sock = _connect(port, ctx)
        if first:
            sock.sendall(first)
        sock.setblocking(False)
        self.slow.append(_Slow(sock, target, attack, time.monotonic(), drip, _source(sock)))

    def start(self) -> None:
        self._thread.start()

    def join(self) -> list[Outcome]:
        self._thread.join()
        return [Outcome(s.target, s.attack, s.closed_after_s, s.everyone_alive, s.source) for s in self.slow]

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.slow:
            sel.register(s.sock, selectors.EVENT_READ, s)
        deadline = min(s.opened for s in self.slow) + IO_TIMEOUT_S + 8.0
        next_drip = time.monotonic()
        try:
            while time.monotonic() < deadline and any(s.closed_after_s is None for s in self.slow
                                                      if s.target != "coordinator"):
                if time.monotonic() >= next_drip:
                    next_drip += 1.0
                    for s in self.slow:
                        if s.closed_after_s is None and s.sent < len(s.drip):
                            with contextlib.suppress(OSError):  # a closed one is noticed by the reads below
                                s.sent += s.sock.send(s.drip[s.sent : s.sent + 1])
                for key, _ in sel.select(0.2):
                    s = key.data
                    try:
                        if s.sock.recv(65536):
                            continue  # the coordinator's HTTP/2 settings, a TLS session ticket
                    except (BlockingIOError, ssl.SSLWantReadError):
                        continue
                    except OSError:
                        pass
                    s.closed_after_s = time.monotonic() - s.opened
                    s.everyone_alive = self.watch.all_alive()
                    sel.unregister(s.sock)
        finally:
            sel.close()
            for s in self.slow:
                s.sock.close()


def _open_loris(loris: Loris, keys: Path, peers: dict[str, int], coordinator: int) -> None:
    """The slow-loris connections of the attack, to every peer and to the coordinator."""
    tls, h2 = _tls_context(keys), _tls_context(keys, h2=True)
    record = b"\x16\x03\x01\x40\x00" + bytes(200)  # a TLS record announcing 16 KiB, a byte a second
    contrib = _frame(Header(kind="contrib", run=RUN, sender=ATTACKER, round=10**6, total=1 << 20, nbytes=1 << 20))
    for _ in range(LORIS_PER_KIND):
        for name, port in [*peers.items(), ("coordinator", coordinator)]:
            loris.open(name, port, "raw: silent")
            loris.open(name, port, "raw: a byte a second", drip=record)
    for _ in range(2):
        for name, port in peers.items():
            loris.open(name, port, "tls: hello at a byte a second", drip=_hello() + bytes(100), ctx=tls)
            loris.open(name, port, "tls: frame at a byte a second", drip=contrib, ctx=tls, first=_hello())
        loris.open("coordinator", coordinator, "tls: HTTP/2 preface at a byte a second", drip=H2_OPEN, ctx=h2)
        # Settings acknowledged, a GetStatus stream opened, its request never sent.
        loris.open("coordinator", coordinator, "tls: stalled gRPC stream", ctx=h2,
                   first=H2_OPEN + _h2(H2_SETTINGS, 0x1, 0) + _h2_get_status_headers())


# ------------------------------------------------------------------ the run


def _peer_command(target: str, keys: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", "peer", "--coordinator", target, "--run-id", RUN,
            "--tls-dir", str(keys), "--peer-id", name, "--task", "average", "--numel", "50000",
            "--rounds", str(ROUNDS), "--work-s", str(WORK_S), "--retry-for-s", "10"]


def _sample_status(observer: Observer, result: HostileRun, stop: threading.Event) -> None:
    """Time a GetStatus every 0.5 s until `stop`: the coordinator must keep answering during the attacks."""
    while not stop.wait(0.5):
        start = time.monotonic()
        try:
            observer.status()
            result.status_latency_s.append(time.monotonic() - start)
        except grpc.RpcError as e:
            result.status_errors.append(f"{e.code()}: {e.details()}")


def _attack(keys: Path, observer: Observer, watch: Watch, addresses: dict[str, str], coordinator: int,
            result: HostileRun) -> None:
    """Every attack at once: the slow-loris connections held open while the one-shots run, twice each."""
    peers = {name: int(address.rpartition(":")[2]) for name, address in addresses.items()}
    loris = Loris(watch)
    _open_loris(loris, keys, peers, coordinator)
    loris.start()
    inflating = [_connect(peers[INFLATED], _tls_context(keys)) for _ in range(INFLATE_CONNECTIONS)]
    for sock in inflating:
        sock.sendall(_inflating_call())  # and held open: the peer then waits for the next call
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_status, args=(observer, result, stop), daemon=True)
    sampler.start()
    try:
        jobs: list[tuple[str, Attack, int]] = []
        for _ in range(2):
            round_ = observer.current_round()
            jobs += [(name, attack, port) for name, port in peers.items() for attack in _peer_attacks(keys, round_)]
            jobs += [("coordinator", attack, coordinator) for attack in _coordinator_attacks(keys)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for name, future in [(name, pool.submit(attack, port)) for name, attack, port in jobs]:
                outcome = future.result()
                outcome.target, outcome.everyone_alive = name, watch.all_alive()
                result.oneshots.append(outcome)
        result.loris = loris.join()
    finally:
        for sock in inflating:
            sock.close()
        stop.set()
        sampler.join()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    """A coordinator and three peers over mutual TLS, attacked from round 1 on; what they did, once all ended."""
    tmp = tmp_path_factory.mktemp("hostile")
    keys = tmp / "keys"
    init_ca(keys, RUN)
    for name in (COORDINATOR, *PEERS, ATTACKER, OBSERVER):
        issue(keys, name)
    result = HostileRun()
    coord: CoordinatorProcess = launch_coordinator(
        tmp, extra_args=["--tls-dir", str(keys), "--run-id", RUN, "--min-peers", str(len(PEERS))])
    procs: dict[str, subprocess.Popen] = {"coordinator": coord.proc}
    files = []
    watch: Watch | None = None
    observer: Observer | None = None
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in PEERS:
            out, err = open(tmp / f"{name}.out", "wb"), open(tmp / f"{name}.err", "wb")  # noqa: SIM115
            files += [out, err]
            procs[name] = subprocess.Popen(_peer_command(coord.target, keys, name), stdout=out, stderr=err,
                                           stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        watch = Watch(procs)
        observer = Observer(coord.port, keys)
        addresses = observer.wait_running({n: procs[n] for n in PEERS}, timeout_s=90.0)
        result.baseline_hwm_kb = {n: _vm_kb(p.pid, "VmHWM") or 0 for n, p in procs.items()}
        try:
            _attack(keys, observer, watch, addresses, coord.port, result)
        finally:  # for whoever debugs a failure
            (tmp / "attacks.json").write_text(json.dumps([asdict(o) for o in result.oneshots + result.loris],
                                                         indent=1))
        over = time.monotonic()
        for name in PEERS:
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[name].wait(timeout=max(1.0, ROUNDS * (WORK_S + 1.0) - (time.monotonic() - over)))
        watch.stop()
        result.died_early = [n for n, t in watch.exited.items() if t < over or n == "coordinator"]
        result.peak_hwm_kb = dict(watch.peak_kb)
        result.codes = {n: procs[n].poll() for n in PEERS}
        result.codes["coordinator"] = coord.stop() if coord.proc.poll() is None else coord.proc.returncode
    finally:
        if observer is not None:
            observer.channel.close()
        if watch is not None:
            watch.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        coord.kill()
        for f in files:
            f.close()
    for name in PEERS:
        result.logs[name] = (tmp / f"{name}.err").read_text(errors="replace")
        lines = [line for line in (tmp / f"{name}.out").read_text().splitlines() if "peer_report" in line]
        if lines:
            result.reports[name] = json.loads(lines[-1])["peer_report"]
    result.logs["coordinator"] = coord.stderr()
    yield result


# ------------------------------------------------------------------ tests


def test_every_process_outlives_the_attacks_and_exits_cleanly(hostile_run: HostileRun) -> None:
    assert hostile_run.died_early == [], {n: hostile_run.logs[n][-3000:] for n in hostile_run.died_early}
    assert hostile_run.codes == {**dict.fromkeys(PEERS, 0), "coordinator": 0}, \
        {n: log[-3000:] for n, log in hostile_run.logs.items()}


def test_the_run_commits_every_round_and_ends_with_one_state_hash(hostile_run: HostileRun) -> None:
    reports = hostile_run.reports
    assert sorted(reports) == sorted(PEERS)
    assert {n: (r["stopped_by"], r["rounds_committed"], r["last_round"]) for n, r in reports.items()} == \
        dict.fromkeys(PEERS, ("done", ROUNDS, ROUNDS - 1))
    assert len({r["state_hash"] for r in reports.values()}) == 1, {n: r["state_hash"] for n, r in reports.items()}


def _rss_growth_kb(run: HostileRun) -> dict[str, int]:
    assert all(0 < base for base in run.baseline_hwm_kb.values()), run.baseline_hwm_kb
    return {n: run.peak_hwm_kb[n] - base for n, base in run.baseline_hwm_kb.items()}


def test_claims_of_2_to_the_40_bytes_allocate_nothing(hostile_run: HostileRun) -> None:
    """No process's peak RSS grew by more than RSS_BOUND_KB over its peak before the attacks (INFLATED has
    a test of its own). RSS misses memory reserved and never written: that the size checks ran before any
    allocation is what the log test's `2**40` lines show."""
    grew = _rss_growth_kb(hostile_run)
    del grew[INFLATED]
    assert max(grew.values()) <= RSS_BOUND_KB, f"peak RSS growth in kB: {grew}"


def test_call_descriptions_do_not_inflate_a_peer_past_the_bound(hostile_run: HostileRun) -> None:
    grew = _rss_growth_kb(hostile_run)[INFLATED]
    assert grew <= RSS_BOUND_KB, f"{INFLATED}'s peak RSS grew by {grew // 1024} MB over " \
                                 f"{INFLATE_CONNECTIONS} connections of one 1 MiB call description each"


def test_the_peers_close_every_hostile_connection_while_the_run_goes_on(hostile_run: HostileRun) -> None:
    oneshots = [o for o in hostile_run.oneshots if o.target != "coordinator"]
    assert {o.target for o in oneshots} == set(PEERS)
    left_open = [(o.target, o.attack) for o in oneshots if o.closed_after_s is None]
    assert left_open == [], f"still open after {CLOSE_WAIT_S} s"
    slow = [o for o in hostile_run.loris if o.target != "coordinator"]
    late = [(o.target, o.attack, o.closed_after_s) for o in slow
            if o.closed_after_s is None or o.closed_after_s > IO_TIMEOUT_S + 5.0]
    assert late == [], f"slow-loris connections not closed within io_timeout_s={IO_TIMEOUT_S} s + 5 s"
    assert all(o.everyone_alive for o in oneshots + slow)


def test_the_coordinator_refuses_hostile_connections_and_keeps_answering(hostile_run: HostileRun) -> None:
    oneshots = [o for o in hostile_run.oneshots if o.target == "coordinator"]
    unanswered = [(o.attack, o.note) for o in oneshots if o.closed_after_s is None]
    assert unanswered == [], f"neither closed nor answered within {CLOSE_WAIT_S} s"
    assert all(o.everyone_alive for o in oneshots)
    assert hostile_run.status_errors == []
    assert len(hostile_run.status_latency_s) > 20 and max(hostile_run.status_latency_s) < 5.0, \
        hostile_run.status_latency_s


PEER_LOG_SAYS = {
    "raw: random garbage": "dropping connection from an unnamed peer at 127.0.0.1:*: [SSL",
    "raw: truncated TLS record": "dropping connection from an unnamed peer at 127.0.0.1:*: connection closed during "
                                 "the TLS handshake",
    "tls: random garbage": "not a swarm data-plane frame",
    "tls: header length 2**32-1": "header length 4294967295 exceeds 65536",
    "tls: frame of 2**40 bytes": f"dropping connection from {ATTACKER} at 127.0.0.1:*: payload of {HUGE} bytes exceeds the limit",
    "tls: payload of 2**40 bytes": f"dropping connection from {ATTACKER} at 127.0.0.1:*: more than max_pending_bytes=",
    "tls: call of 2**40 bytes": f"call message of more than {MAX_CALL_BYTES} bytes",
    "tls: truncated frame": f"dropping connection from {ATTACKER} at 127.0.0.1:*: connection closed mid-frame",
    "tls: hello as another peer": f"the certificate of '{ATTACKER}' claims to be 'alice'",
    "tls: hello of another run": f"peer {ATTACKER} belongs to run 'other-run'",
    "slow loris": "dropping connection from an unnamed peer at 127.0.0.1:*: stalled mid-frame",
    "slow loris after hello": f"dropping connection from {ATTACKER} at 127.0.0.1:*: stalled mid-frame",
}
"""What each peer's log says of an attack: the offender's hello or certificate name, else "an unnamed peer", and
its address (`*` matches a port)."""


def _logged(log: str, says: str) -> bool:
    """Whether `log` holds `says`, each `*` in it standing for a port number."""
    return re.search(r"\d+".join(re.escape(part) for part in says.split("*")), log) is not None
OVERFLOW = "tls: call whose shape overflows int64"


@pytest.mark.parametrize("attack", sorted(PEER_LOG_SAYS))
def test_each_peer_logs_why_it_dropped_a_hostile_connection(hostile_run: HostileRun, attack: str) -> None:
    for name in PEERS:
        assert _logged(hostile_run.logs[name], PEER_LOG_SAYS[attack]), hostile_run.logs[name][-4000:]


def test_each_peer_logs_a_line_per_dropped_connection(hostile_run: HostileRun) -> None:
    for name in PEERS:
        attacks = [o for o in hostile_run.oneshots + hostile_run.loris if o.target == name and o.attack != OVERFLOW]
        assert hostile_run.logs[name].count("dropping connection from ") >= len(attacks)


def test_a_call_whose_array_shape_overflows_int64_is_dropped_as_a_bad_frame(hostile_run: HostileRun) -> None:
    for name in PEERS:
        assert "Task exception was never retrieved" not in hostile_run.logs[name]
        attacks = [o for o in hostile_run.oneshots + hostile_run.loris if o.target == name]
        assert hostile_run.logs[name].count("dropping connection from ") >= len(attacks)


def test_a_hostile_connection_with_a_certificate_is_logged_under_its_name(hostile_run: HostileRun) -> None:
    for name in PEERS:
        for says in ("not a swarm data-plane frame", "header length 4294967295", "call message of more than"):
            assert _logged(hostile_run.logs[name], f"dropping connection from {ATTACKER} at 127.0.0.1:*: {says}")


def test_a_hostile_connection_without_a_certificate_is_logged_under_its_address(hostile_run: HostileRun) -> None:
    raw = [o for o in hostile_run.oneshots if o.target in PEERS and o.attack.startswith("raw:")]
    assert raw
    unnamed = [(o.target, o.attack, o.source) for o in raw if o.source not in hostile_run.logs[o.target]]
    assert unnamed == []
