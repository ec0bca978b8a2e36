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
import logging
import socket
from typing import TYPE_CHECKING

from swarm.transport.links import wait_ready

if TYPE_CHECKING:
    from swarm.transport.endpoint import Endpoint

log = logging.getLogger("swarm.transport")

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


async def serve_splice(ep: Endpoint, sock: socket.socket, key: bytes, where: str) -> None:
    """Pair `sock` with the connection of the same key and copy between them until one closes."""
    waiting = ep._splices
    partner = waiting.pop(key, None)
    loop = asyncio.get_running_loop()
    if partner is None:
        if len(waiting) >= MAX_WAITING:
            raise ConnectionError(f"{len(waiting)} splice requests already wait for their partner")
        paired: asyncio.Future[None] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()
        waiting[key] = (sock, paired, finished)
        try:
            async with asyncio.timeout(ep.config.connect_timeout_s):
                await paired
        except TimeoutError:
            raise ConnectionError(f"nobody came to splice key {key[:80]!r} within "
                                  f"{ep.config.connect_timeout_s:g} s") from None
        finally:
            if waiting.get(key, (None,))[0] is sock:
                del waiting[key]
        await finished  # the partner's task copies both ways until the splice ends
        return
    other, paired, finished = partner
    paired.set_result(None)
    log.debug("data plane: relaying %r for %s", key[:80], where)
    try:
        await asyncio.gather(_copy(ep, loop, sock, other), _copy(ep, loop, other, sock))
    finally:
        other.close()
        finished.set_result(None)


async def open_splice(ep: Endpoint, relay: str, key: bytes) -> socket.socket:
    """A connection to `relay` asking for the splice `key` (preamble sent): its other end is the peer
    that sends the same key.

    Raises:
        OSError, TimeoutError: the relay cannot be reached within connect_timeout_s.
    """
    host, _, port = relay.rpartition(":")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with asyncio.timeout(ep.config.connect_timeout_s):
            await loop.sock_connect(sock, (host.strip("[]"), int(port)))
            await loop.sock_sendall(sock, MAGIC + len(key).to_bytes(2, "big") + key)
    except BaseException:
        sock.close()
        raise
    return sock


async def _copy(ep: Endpoint, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(_COPY_BYTES)
    view = memoryview(buf)
    try:
        while n := await loop.sock_recv_into(src, view):
            await loop.sock_sendall(dst, view[:n])
            ep.bytes_relayed += n
    except OSError:
        pass
    finally:  # one side is gone: end the other so both ends see it
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError("connection closed inside a splice preamble")
        got += n
