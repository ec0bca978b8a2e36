"""Relaying: two peers that accept no inbound connection meet through one that does.

Each of the two dials the relay's data port and says which pair and lane it is for (the splice
preamble: MAGIC, then a length-prefixed key). The relay pairs the two connections with the same key
and copies bytes both ways until either closes; it reads nothing past the preamble, so the two ends
run their own TLS and frames over it, end to end: the relay sees only ciphertext and cannot pose as
either (their certificates are checked as on a direct connection). Its cost is the relay's
bandwidth, twice (in and out), counted in its `bytes_relayed`.

The relay trusts nothing in a preamble: a key waits at most `connect_timeout_s` for its partner, a
relay holds at most MAX_WAITING unpaired keys, and the per-address connection cap applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from swarm.transport.links import tune, wait_ready

log = logging.getLogger("swarm.relay")

MAGIC = b"SWSPLICE"
"""How a splice request begins (a data-plane frame begins with frames.MAGIC, TLS with 0x16)."""
MAX_KEY_BYTES = 512
MAX_WAITING = 256
"""Unpaired splice requests a relay holds at once."""
_COPY_BYTES = 256 << 10


def splice_key(run: str, a: str, b: str, lane: int) -> bytes:
    """The key both ends of lane `lane` between `a` and `b` send (the same whoever sends it)."""
    low, high = sorted((a, b))
    return f"{run}/{low}/{high}/{lane}".encode()


async def first_bytes(sock: socket.socket, want: int) -> bytes:
    """Peek at up to `want` bytes of a new connection without consuming them: fewer only once the peer has
    closed, or as soon as they cannot begin with MAGIC."""
    while True:
        await wait_ready(sock.fileno())
        seen = sock.recv(want, socket.MSG_PEEK)
        if len(seen) >= want or not seen or not MAGIC.startswith(seen[: len(MAGIC)]):
            return seen
        await asyncio.sleep(0.01)  # a partial preamble: wait for the rest


async def read_key(sock: socket.socket) -> bytes:
    """Consume a splice preamble (its MAGIC already peeked); the key.

    Raises:
        ConnectionError: malformed, oversized or cut short.
    """
    loop = asyncio.get_running_loop()
    head = bytearray(len(MAGIC) + 2)
    await _recv_exactly(loop, sock, memoryview(head))
    size = int.from_bytes(head[len(MAGIC):], "big")
    if not 0 < size <= MAX_KEY_BYTES:
        raise ConnectionError(f"splice key of {size} bytes (1..{MAX_KEY_BYTES})")
    key = bytearray(size)
    await _recv_exactly(loop, sock, memoryview(key))
    return bytes(key)


class Relay:
    """Pairs splice requests and copies between the two connections of each pair.

    Args:
        pair_timeout_s: how long a request waits for its partner.
    """

    def __init__(self, pair_timeout_s: float) -> None:
        self.pair_timeout_s = pair_timeout_s
        self.bytes_relayed = 0
        """Bytes copied, both directions of every pair."""
        self._waiting: dict[bytes, tuple[socket.socket, asyncio.Future[None], asyncio.Future[None]]] = {}

    @property
    def waiting(self) -> int:
        """Requests waiting for their partner now."""
        return len(self._waiting)

    async def serve(self, sock: socket.socket, key: bytes, where: str) -> None:
        """Pair `sock` with the connection of the same key and copy between them until one closes.

        Raises:
            ConnectionError: no partner came in time, or too many requests wait already.
        """
        partner = self._waiting.pop(key, None)
        loop = asyncio.get_running_loop()
        if partner is None:
            if len(self._waiting) >= MAX_WAITING:
                raise ConnectionError(f"{len(self._waiting)} splice requests already wait for their partner")
            paired: asyncio.Future[None] = loop.create_future()
            finished: asyncio.Future[None] = loop.create_future()
            self._waiting[key] = (sock, paired, finished)
            try:
                async with asyncio.timeout(self.pair_timeout_s):
                    await paired
            except TimeoutError:
                raise ConnectionError(f"nobody came to splice key {key[:80]!r} within "
                                      f"{self.pair_timeout_s:g} s") from None
            finally:
                if self._waiting.get(key, (None,))[0] is sock:
                    del self._waiting[key]
            await finished  # the partner's task copies both ways until the splice ends
            return
        other, paired, finished = partner
        paired.set_result(None)
        log.debug("relaying %r for %s", key[:80], where)
        try:
            await asyncio.gather(self._copy(loop, sock, other), self._copy(loop, other, sock))
        finally:
            other.close()
            finished.set_result(None)

    async def _copy(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
        view = memoryview(bytearray(_COPY_BYTES))
        try:
            while n := await loop.sock_recv_into(src, view):
                await loop.sock_sendall(dst, view[:n])
                self.bytes_relayed += n
        except OSError:
            pass
        finally:  # one side is gone: end the other so both ends see it
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


async def open_splice(relay: str, key: bytes, timeout_s: float) -> socket.socket:
    """A connection to `relay` asking for the splice `key` (preamble sent): its other end is the peer
    that sends the same key.

    Raises:
        OSError, TimeoutError: the relay cannot be reached within `timeout_s`.
    """
    host, _, port = relay.rpartition(":")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    tune(sock)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host.strip("[]"), int(port)))
            await loop.sock_sendall(sock, MAGIC + len(key).to_bytes(2, "big") + key)
    except BaseException:
        sock.close()
        raise
    return sock


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError("connection closed inside a splice preamble")
        got += n


async def serve_forever(relay: Relay, listener: socket.socket, max_per_address: int = 256,
                        preamble_timeout_s: float = 10.0) -> None:
    """Serve splice requests on `listener` (a bound, listening, non-blocking socket) until cancelled: the
    stand-alone `swarm relay`, for runs where no member can be dialed. Anything but a splice request is
    closed at once."""
    loop = asyncio.get_running_loop()
    per_address: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(sock: socket.socket, host: str, where: str) -> None:
        try:
            async with asyncio.timeout(preamble_timeout_s):
                if await first_bytes(sock, len(MAGIC)) != MAGIC:
                    raise ConnectionError("not a splice request")
                key = await read_key(sock)
            await relay.serve(sock, key, where)
        except (ConnectionError, OSError, TimeoutError) as e:
            log.info("relay: dropping connection from %s: %s", where, e or "no splice request in time")
        finally:
            sock.close()
            per_address[host] -= 1
            if not per_address[host]:
                del per_address[host]

    try:
        while True:
            try:
                sock, remote = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say
                log.error("relay: cannot accept a connection (%s); trying again in 0.5 s", e)
                await asyncio.sleep(0.5)
                continue
            host = str(remote[0])
            if per_address.get(host, 0) >= max_per_address:
                sock.close()
                continue
            per_address[host] = per_address.get(host, 0) + 1
            tune(sock)
            task = loop.create_task(one(sock, host, f"{host}:{remote[1]}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
