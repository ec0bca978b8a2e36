"""A peer's data-plane endpoint: one listening socket, pooled outgoing connections.

Payloads move between sockets and memory without Python touching bytes:
`sock_sendall` sends from a memoryview of the payload and `sock_recv_into`
writes into its destination (an attempt's inbox, `inbox.py`). What the
payloads mean is the caller's business; messages (`state`, `call`) are in
`messages.py`.

Failure detection: a connection that breaks, a frame that stalls past
`io_timeout_s`, or a bad frame marks its sender failed in every open inbox
that still expects data from it, which wakes the waiting all-reduce at once
instead of at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import numpy as np

from swarm.security.revocation import NONE as NO_REVOCATIONS
from swarm.security.revocation import Revocations
from swarm.transport import accept, messages, reversal
from swarm.transport.config import TransportConfig
from swarm.transport.faults import NO_FAULTS, FaultInjector
from swarm.transport.frames import (
    PREFIX,
    FrameError,
    Header,
    Idle,
    checksum,
    decode_header,
    decode_prefix,
    encode_header,
)
from swarm.transport.inbox import BufferPool, Inbox, PeerFailure
from swarm.transport.links import Link, TlsLink, tune
from swarm.transport.messages import StateSnapshot
from swarm.transport.meter import UploadMeter
from swarm.transport.relay import Relay

__all__ = ["CallHandler", "Endpoint", "Inbox", "PeerFailure", "StateSnapshot", "TransportConfig"]
log = logging.getLogger("swarm.transport")
_SCRATCH_BYTES = 1 << 20
CallHandler = Callable[[str, dict[str, Any], dict[str, np.ndarray]],
                       Awaitable[tuple[dict[str, Any], dict[str, np.ndarray]]]]
"""(caller's peer id, description, arrays) -> the reply's (description, arrays)."""


class Endpoint:
    """Listens for frames from other peers and sends frames to them.

    Args:
        peer_id: this peer's id (sent in the hello frame of each connection).
        run_id: frames of other runs are refused.
        config: sockets, sizes and deadlines.
        faults: the fault-injection seam (no faults by default).
    """

    def __init__(self, peer_id: str, run_id: str, config: TransportConfig, faults: FaultInjector = NO_FAULTS) -> None:
        self.peer_id = peer_id
        self.run_id = run_id
        self.config = config
        self.faults = faults
        self.address = ""
        self._inboxes: dict[tuple[int, int], Inbox] = {}
        self._closed: set[tuple[int, int]] = set()
        self._conns: dict[str, list[tuple[Link, asyncio.Lock]]] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._pool = BufferPool()
        self._readers: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}
        """Open incoming connections per remote address."""
        self._refused_logged: dict[str, float] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.upload = UploadMeter()
        """This peer's upload rate on large frames (reported to the coordinator, which sizes parts by it)."""
        self.state_provider: Callable[[], StateSnapshot | None] | None = None
        """What this peer serves to a peer that asks for its state (None: nothing to give)."""
        self.call_handler: CallHandler | None = None
        """What answers other peers' calls (None: calls are refused with an error reply)."""
        self._idle_calls: dict[str, list[Link]] = {}
        self._last_sent: dict[Link, float] = {}
        """When each pooled outgoing connection last carried a frame (loop time)."""
        self._tls = config.tls.contexts() if config.tls is not None else None
        """(server, client) TLS contexts, when the data plane runs over TLS."""
        self.revocations: Revocations = NO_REVOCATIONS
        """Certificates refused on this data plane (the run's crl.pem, as the coordinator hands it out)."""
        self.dials_out = False
        """Others cannot dial this peer (behind NAT): it dials them and both send on that (reversal.py)."""
        self._dialed_in = asyncio.Event()
        """Set when a peer that dials out has dialed in (reversal.wait_for_dial_in)."""
        self.relay = Relay(config.connect_timeout_s)
        """What this peer does as the relay of two members that cannot dial each other (relay.py)."""
        self.horizon = -1
        """The round this peer takes part in next (`set_horizon`); -1: not said, no round window."""

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> str:
        """Start listening; returns the host:port others should dial."""
        sock = socket.create_server((self.config.host, self.config.port), reuse_port=False)
        sock.setblocking(False)
        self._listener = sock
        port = sock.getsockname()[1]
        host = self.config.advertise_host or self.config.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.address = f"{host}:{self.config.advertise_port or port}"
        self.dials_out = not self.config.inbound
        self._accept_task = asyncio.get_running_loop().create_task(accept.accept_loop(self))
        return self.address

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._readers):
            task.cancel()
        for conns in self._conns.values():
            for sock, _ in conns:
                sock.close()
        self._conns.clear()
        for idle in self._idle_calls.values():
            for sock in idle:
                sock.close()
        self._idle_calls.clear()
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*self._readers, *(t for t in [self._accept_task] if t), return_exceptions=True)

    # --------------------------------------------------------------- inboxes

    def inbox(self, round: int, attempt: int) -> Inbox:
        """The inbox of (round, attempt), created if needed; marks it started (its caller says what it
        expects before awaiting anything, so frames of payloads it does not expect are refused)."""
        box = self._inboxes.get((round, attempt))
        if box is None:
            box = self._inboxes[(round, attempt)] = Inbox(round, attempt)
        box.started = True
        box.pending_bytes = 0
        box.pending_by.clear()
        return box

    def close_inbox(self, round: int, attempt: int) -> None:
        """Forget (round, attempt) and every older attempt of it; late frames get discarded.

        Their buffers go back to the pool once no payload is being received into them.
        """
        for key in [k for k in self._inboxes if k[0] < round or (k[0] == round and k[1] <= attempt)]:
            self._forget(key)
            self._closed.add(key)
        self._closed.add((round, attempt))
        if len(self._closed) > 4096:
            newest = max(k[0] for k in self._closed)
            self._closed = {k for k in self._closed if k[0] > newest - 64}

    def _sink(self, h: Header) -> memoryview | None:
        """Where the bytes of `h` go, or None to discard them."""
        key = (h.round, h.attempt)
        if key in self._closed:
            return None
        box = self._inboxes.get(key)
        if box is None or not box.started:
            if 0 <= h.round < self.horizon:
                return None  # a round this peer has left behind: late, not hostile
            if self.horizon >= 0 and h.round > self.horizon + 1:
                raise FrameError(f"{h.sender} sent data for round {h.round}; this peer is at round {self.horizon}")
        if box is None:
            box = self._inboxes[key] = Inbox(h.round, h.attempt)
        buf = box.sink(h.kind, h.sender, h.total, h.tag, self._allocate)
        return memoryview(buf[h.offset : h.offset + h.nbytes]).cast("B")

    def _allocate(self, box: Inbox, sender: str, nbytes: int) -> np.ndarray:
        if not box.started:
            pending = sum(b.pending_bytes for b in self._inboxes.values())
            if pending + nbytes > self.config.max_pending_bytes:
                raise FrameError(f"more than max_pending_bytes={self.config.max_pending_bytes} for attempts not started")
            mine = sum(b.pending_by.get(sender, 0) for b in self._inboxes.values())
            if mine + nbytes > self.config.max_pending_bytes_per_peer:
                raise FrameError(f"{sender} would hold more than max_pending_bytes_per_peer="
                                 f"{self.config.max_pending_bytes_per_peer} for attempts not started")
            box.pending_bytes += nbytes
            box.pending_by[sender] = box.pending_by.get(sender, 0) + nbytes
        return self.buffer(nbytes, np.uint8)

    def revoked(self, link: Link) -> bool:
        """Whether `link`'s other side shows a revoked certificate (checked at the handshake and at every frame)."""
        return link.peer_cert is not None and self.revocations.refuses(link.peer_cert)

    def set_horizon(self, round: int) -> None:
        """This peer takes part in `round` next: early data is accepted for it and the round after only,
        and what earlier rounds' attempts received without ever starting is freed."""
        self.horizon = max(self.horizon, round)
        for key in [k for k, b in self._inboxes.items() if k[0] < self.horizon and not b.started]:
            self._forget(key)

    def _forget(self, key: tuple[int, int]) -> None:
        """Drop an inbox; its buffers go back to the pool once no payload is being received into them."""
        box = self._inboxes.pop(key)
        box.closed = True
        if box.writing == 0:
            self._recycle(box)

    def buffer(self, numel: int, dtype: np.dtype | str) -> np.ndarray:
        """An uninitialised array, reused from earlier attempts when one of that size is free."""
        return self._pool.take(numel, dtype)

    def release(self, array: Any) -> None:
        """Give back an array from `buffer` (or a tensor over one: an all-reduce's result) once unused."""
        self._pool.give(array)

    def _recycle(self, box: Inbox) -> None:
        for buf in box.buffers:
            self.release(buf)
        box.buffers.clear()
        box.mail.clear()

    def _fail_everywhere(self, peer: str, reason: str) -> None:
        for box in self._inboxes.values():
            if box.owes(peer):
                box.fail(peer, reason)

    # -------------------------------------------------------------- receiving

    async def recv_exactly(self, conn: Link, view: memoryview) -> None:
        """Fill `view` from `conn` (counted in `bytes_received`); ConnectionError if it closes first."""
        got = 0
        while got < len(view):
            n = await conn.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("connection closed mid-frame")
            got += n
        self.bytes_received += got

    async def read_header(self, conn: Link, idle_s: float | None = None) -> Header | None:
        """The next frame's header (None: `conn` closed between frames); FrameError if it is malformed.

        Args:
            idle_s: how long to wait for the frame to begin (None: forever); `Idle` past it.
        """
        prefix = bytearray(PREFIX.size)
        try:
            async with asyncio.timeout(idle_s):
                first = await conn.recv_into(memoryview(prefix))
        except TimeoutError:
            raise Idle from None
        if first == 0:
            return None
        async with asyncio.timeout(self.config.io_timeout_s):
            await self.recv_exactly(conn, memoryview(prefix)[first:])
            body = bytearray(decode_prefix(bytes(prefix)))
            await self.recv_exactly(conn, memoryview(body))
        return decode_header(bytes(body), self.config.max_frame_bytes)

    async def _read_payload(self, conn: Link, h: Header) -> None:
        rule = self.faults.hit(f"recv.{h.kind}", round=h.round, attempt=h.attempt, peer=h.sender) if self.faults else None
        if rule is not None and rule.action == "delay":
            await asyncio.sleep(rule.delay_s)
        if rule is not None and rule.action == "close":
            raise ConnectionError("fault injected: connection closed")
        if h.kind not in ("hello", "abort", "contrib", "result"):
            raise FrameError(f"a {h.kind} frame on an all-reduce connection")
        sink = None if h.kind in ("hello", "abort") or (rule and rule.action == "drop") else self._sink(h)
        if sink is None:
            scratch = memoryview(bytearray(min(h.nbytes, _SCRATCH_BYTES)))  # only while discarding
            async with asyncio.timeout(self.config.io_timeout_s):
                left = h.nbytes
                while left:
                    n = min(left, len(scratch))
                    await self.recv_exactly(conn, scratch[:n])
                    left -= n
            return
        box = self._inboxes[(h.round, h.attempt)]
        box.writing += 1  # its buffers must not be recycled while this payload lands in them
        try:
            async with asyncio.timeout(self.config.io_timeout_s):
                await self.recv_exactly(conn, sink)
        finally:
            box.writing -= 1
            if box.closed and box.writing == 0:
                self._recycle(box)
        if box.closed:
            return
        if rule is not None and rule.action == "corrupt" and len(sink):
            sink[0] ^= 0xFF
        if checksum(sink) != h.checksum:
            raise FrameError(f"checksum mismatch in a {h.kind} frame of round {h.round} (corrupted in transit)")
        box.landed(h.kind, h.sender, h.offset, h.nbytes)

    # ---------------------------------------------------------------- sending

    async def _connection(self, peer: str, address: str, index: int) -> tuple[Link, asyncio.Lock]:
        """The `index`-th connection to send to `peer` on, dialed if need be (`address` ""; `peer` dials us)."""
        conns = self._conns.get(peer, [])
        if len(conns) <= index:
            if not address:
                return await reversal.wait_for_dial_in(self, peer, index)
            # One dial at a time per peer: the concurrent sends of a part's chunks would each open a connection.
            async with self._dialing.setdefault(peer, asyncio.Lock()):
                conns = self._conns.setdefault(peer, [])
                while len(conns) <= index:
                    self.add_lane(peer, await self.dial(peer, address, duplex=self.dials_out))
        return conns[index]

    def add_lane(self, peer: str, link: Link) -> None:
        """Send to `peer` on `link`, which this peer dialed; when it dials out, read what comes back on it."""
        self._conns.setdefault(peer, []).append((link, asyncio.Lock()))
        if self.dials_out:
            self.spawn(reversal.serve_dialed(self, peer, link))

    @property
    def bytes_relayed(self) -> int:
        """Bytes this peer copied between two others that cannot dial each other."""
        return self.relay.bytes_relayed

    def serve(self, sock: socket.socket, where: str) -> None:
        """Serve a connection this peer opened as if it had accepted it (one end of a relayed splice)."""
        self.spawn(accept.serve_connection(self, sock, "", where))

    def spawn(self, reader: Coroutine[Any, Any, None]) -> None:
        """Run a connection's reader until it ends (cancelled by `close`)."""
        task = asyncio.get_running_loop().create_task(reader)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def reach_out(self, peers: list[tuple[str, str]], relay_address: str = "") -> None:
        """Dial (peer, address) ahead of an attempt when others cannot dial this peer, through `relay_address`
        to peers without an address (see `reversal.reach_out`)."""
        if self.dials_out:
            await reversal.reach_out(self, peers, relay_address)

    async def dial(self, peer: str, address: str, duplex: bool = False) -> Link:
        """A new connection to `peer` at `address`, hello sent; PeerFailure if it cannot be made in time.

        Args:
            duplex: the hello says the peer may send back on it (this peer accepts no inbound connection).
        """
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        tune(sock, self.config.congestion_control)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await asyncio.get_running_loop().sock_connect(sock, (host.strip("[]"), int(port)))
        except (OSError, TimeoutError) as e:
            sock.close()
            raise PeerFailure(peer, f"cannot connect to {address}: {e or 'timed out'}") from None
        return await self.greet(sock, peer, duplex, f"cannot connect to {address}")

    async def greet(self, sock: socket.socket, peer: str, duplex: bool, failing: str) -> Link:
        """Open a connected socket to `peer` as its dialer: TLS (checking the certificate is `peer`'s) and hello.

        Raises:
            PeerFailure: `failing`: why, within connect_timeout_s.
        """
        link = Link(sock)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                if self._tls is not None:
                    link = TlsLink(sock, self._tls[1], server_side=False)
                    await link.handshake()
                    if link.peer_name != peer:  # a certificate of the run, but not of the peer we dial
                        raise ConnectionError(f"its certificate is {link.peer_name!r}'s")
                    if self.revoked(link):
                        raise ConnectionError(f"its certificate ({peer!r}) is revoked (the run's crl.pem)")
                await link.send(encode_header(Header(kind="hello", run=self.run_id, sender=self.peer_id,
                                                     tag=reversal.DUPLEX if duplex else "")))
        except (OSError, TimeoutError, ConnectionError) as e:
            link.close()
            sock.close()  # a no-op once TLS owns the descriptor
            raise PeerFailure(peer, f"{failing}: {e or 'timed out'}") from None
        return link

    def _drop_connections(self, peer: str) -> None:
        for sock, _ in self._conns.pop(peer, []):
            self._last_sent.pop(sock, None)
            sock.close()

    async def send(self, peer: str, address: str, header: Header, payload: memoryview, lane: int = 0,
                   digest: int | None = None) -> None:
        """Send one frame to `peer` on connection `lane % connections_per_peer`.

        Args:
            digest: the payload's checksum when the caller already has it (a part sent to many peers).
        Raises:
            PeerFailure: the peer cannot be reached or the send stalled past io_timeout_s.
        """
        rule = self.faults.hit(f"send.{header.kind}", round=header.round, attempt=header.attempt, peer=peer) if self.faults else None
        if rule is not None:
            if rule.action == "drop":
                return
            if rule.action == "delay":
                await asyncio.sleep(rule.delay_s)
            if rule.action == "close":
                self._drop_connections(peer)
                return
        header = replace(header, sender=self.peer_id, run=self.run_id, nbytes=len(payload),
                         checksum=checksum(payload) if digest is None else digest)
        if rule is not None and rule.action == "corrupt" and len(payload):
            damaged = bytearray(payload)
            damaged[0] ^= 0xFF
            payload = memoryview(damaged)
        loop = asyncio.get_running_loop()
        index = lane % self.config.connections_per_peer
        sock, lock = await self._connection(peer, address, index)
        async with lock:
            if address and loop.time() - self._last_sent.get(sock, loop.time()) > self.config.idle_timeout_s / 2:
                # The receiver may close it any moment now; a frame written into a closing connection
                # can vanish without an error here, so it is replaced before it is used again.
                sock = await self._redial(peer, address, index, sock)
            timed = self.upload.start(len(payload))
            try:
                async with asyncio.timeout(self.config.io_timeout_s):
                    await sock.send(encode_header(header))
                    await sock.send(payload)
            except BaseException as e:
                if timed:
                    self.upload.done(len(payload), sent=False)
                # A frame cut short (error, stall or cancellation) would make the receiver read the next
                # frame's header as payload: the connection cannot be reused.
                self._drop_connections(peer)
                if not isinstance(e, (OSError, TimeoutError)):
                    raise
                raise PeerFailure(peer, f"send failed: {e or 'stalled'}") from None
            if timed:
                self.upload.done(len(payload))
            self._last_sent[sock] = loop.time()
        self.bytes_sent += len(payload)

    async def _redial(self, peer: str, address: str, index: int, old: Link) -> Link:
        """A new connection in place of `old` (the `index`-th to `peer`), keeping its lock."""
        conns = self._conns.get(peer, [])
        fresh = await self.dial(peer, address)
        self._last_sent.pop(old, None)
        old.close()
        if index < len(conns) and conns[index][0] is old:
            conns[index] = (fresh, conns[index][1])
        return fresh


    # ----------------------------------------------- messages (messages.py)

    async def fetch_state(self, peer: str, address: str, timeout_s: float) -> StateSnapshot:
        """Download `peer`'s committed state over a connection of its own (see `messages.fetch_state`)."""
        return await messages.fetch_state(self, peer, address, timeout_s)

    async def call(self, peer: str, address: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                   timeout_s: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send a request to `peer`'s call handler and return its reply (see `messages.call`)."""
        return await messages.call(self, peer, address, meta, arrays, timeout_s)
