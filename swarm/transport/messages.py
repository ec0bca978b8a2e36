"""Messages on the data plane: a msgpack description and named arrays, as frames of one kind.

A message (kinds `state`, `call`, `reply`) travels on a connection of its own: part 0 carries the
description, then parts 1.. carry the arrays' bytes end to end in chunks. A receiver allocates only
what the description declares, within a limit, and checks every chunk's place and checksum. Two
services use them: a donor's committed state (`state_req` -> `state`) and calls to a peer's handler
(`call` -> `reply`, pipeline stages' microbatches).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from swarm.transport.frames import FrameError, Header, checksum, encode_header
from swarm.transport.inbox import PeerFailure
from swarm.transport.meter import transfer_allowance_s

if TYPE_CHECKING:
    from swarm.transport.endpoint import Endpoint
    from swarm.transport.links import Link

log = logging.getLogger("swarm.transport")
MAX_META_BYTES = 1 << 20
"""Largest description accepted."""
_UNPACK_LIMITS = {"max_array_len": 1 << 16, "max_map_len": 1024, "max_str_len": 1 << 16, "max_bin_len": 1 << 20,
                  "max_ext_len": 0}
"""A description is a few scalars and one spec per array (a state has one per tensor): larger containers are
refused while unpacking. What one description unpacks to is freed as soon as its message is answered."""
_MAX_DIMS = 32
_DTYPES = frozenset({"float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool"})
"""Array dtypes a message may carry (never object arrays)."""
_IDLE_CALLS_PER_PEER = 8
"""Idle call connections kept per peer for the next calls."""


@dataclass(slots=True)
class StateSnapshot:
    """A donor's committed state as it travels: a small description and named flat arrays."""

    meta: dict[str, Any]
    """msgpack-able facts about the state (its round and hash, say)."""
    arrays: dict[str, np.ndarray]
    """name -> array (any shape; sent as its bytes in C order)."""


@dataclass(slots=True)
class _Frame:
    part: int
    offset: int
    nbytes: int
    total: int
    payload: memoryview


async def send_message(ep: Endpoint, conn: Link, kind: str, meta: dict[str, Any],
                       arrays: dict[str, np.ndarray]) -> None:
    """Send one message on `conn`: the description, then the arrays' bytes in chunks."""
    views = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values()]
    described = dict(meta, arrays=[[name, str(a.dtype), list(a.shape)] for name, a in arrays.items()])
    body = msgpack.packb(described, use_bin_type=True)
    total = sum(len(v) for v in views)
    frames = [(Header(kind=kind, part=0, total=len(body)), memoryview(body))]
    offset = 0
    for view in views:
        for start in range(0, len(view), ep.config.chunk_bytes):
            chunk = view[start : start + ep.config.chunk_bytes]
            frames.append((Header(kind=kind, part=1, offset=offset, total=total), chunk))
            offset += len(chunk)
    for header, payload in frames:
        header = Header(kind=header.kind, run=ep.run_id, sender=ep.peer_id, part=header.part, offset=header.offset,
                        total=header.total, nbytes=len(payload), checksum=checksum(payload))
        async with asyncio.timeout(ep.config.io_timeout_s):
            await conn.send(encode_header(header))
            await conn.send(payload)
        ep.bytes_sent += len(payload)


async def read_message(ep: Endpoint, sock: Link, peer: str, kind: str, limit: int, first: Header | None = None,
                       sized: Callable[[int], None] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one message of `kind` from `peer` (its first header already read when `first` is given); `sized` is
    told the arrays' total bytes once the description is read and checked.

    Raises:
        FrameError: a malformed, misordered, corrupted or oversized message (over `limit` bytes
            of arrays), or arrays of a dtype outside the message dtypes.
        ConnectionError: the peer closed the connection mid-message.
    """
    head = await _read_frame(ep, sock, peer, kind, MAX_META_BYTES, first=first)
    if head.part != 0:
        raise FrameError(f"a {kind} message must start with its description")
    try:
        meta = msgpack.unpackb(bytes(head.payload), raw=False, **_UNPACK_LIMITS)
    except Exception as e:  # noqa: BLE001 - msgpack raises many unrelated types for garbage
        raise FrameError(f"malformed {kind} description: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays", []), list):
        raise FrameError(f"{kind} description is not a map with an array list")
    arrays: dict[str, np.ndarray] = {}
    for spec in meta.pop("arrays", []):
        if (not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[0], str)
                or spec[1] not in _DTYPES or not isinstance(spec[2], list)
                or len(spec[2]) > _MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in spec[2])):
            raise FrameError(f"bad array description in a {kind} message: {str(spec)[:80]}")
        nbytes = math.prod(spec[2]) * np.dtype(spec[1]).itemsize  # Python ints: no wrap-around
        if nbytes > limit:
            raise FrameError(f"{kind} message of more than {limit} bytes")
        arrays[spec[0]] = np.empty(spec[2], dtype=np.dtype(spec[1]))
    total = sum(a.nbytes for a in arrays.values())
    if total > limit:
        raise FrameError(f"{kind} message of {total} bytes exceeds the limit of {limit}")
    if sized is not None:
        sized(total)
    flat = np.empty(total, dtype=np.uint8)
    got = 0
    while got < total:
        frame = await _read_frame(ep, sock, peer, kind, ep.config.max_frame_bytes, into=flat)
        if frame.part != 1 or frame.offset != got or frame.total != total or frame.nbytes == 0:
            raise FrameError(f"{kind} chunks out of order or of another size")
        got += frame.nbytes
    offset = 0
    for a in arrays.values():
        a.reshape(-1).view(np.uint8)[:] = flat[offset : offset + a.nbytes]
        offset += a.nbytes
    return meta, arrays


async def _read_frame(ep: Endpoint, sock: Link, peer: str, kind: str, limit: int,
                      into: np.ndarray | None = None, first: Header | None = None) -> _Frame:
    h = first if first is not None else await ep.read_header(sock)
    if h is None:
        raise ConnectionError(f"{peer} closed the connection during a {kind} message")
    if h.kind != kind or h.sender != peer or h.nbytes > limit:
        raise FrameError(f"unexpected {h.kind} frame from {h.sender} during a {kind} message")
    if into is None:
        if h.offset != 0 or h.nbytes != h.total:
            raise FrameError(f"a {kind} description must come in one frame")
        payload = memoryview(bytearray(h.nbytes))
    else:
        if h.offset + h.nbytes > into.size:
            raise FrameError(f"{kind} chunk lies outside the declared message")
        payload = memoryview(into[h.offset : h.offset + h.nbytes]).cast("B")
    async with asyncio.timeout(ep.config.io_timeout_s):
        await ep.recv_exactly(sock, payload)
    if checksum(payload) != h.checksum:
        raise FrameError(f"checksum mismatch in a {kind} frame (corrupted in transit)")
    return _Frame(h.part, h.offset, h.nbytes, h.total, payload)


async def serve_state(ep: Endpoint, conn: Link, asker: str) -> None:
    """Answer a `state_req` on its own connection: the description, then the bytes in chunks."""
    snapshot = ep.state_provider() if ep.state_provider is not None else None
    if snapshot is None:
        meta: dict[str, Any] = {"error": f"{ep.peer_id} holds no committed state to give"}
        arrays: dict[str, np.ndarray] = {}
    else:
        meta, arrays = dict(snapshot.meta), snapshot.arrays
    log.info("data plane: sending state (%d bytes) to %s", sum(a.nbytes for a in arrays.values()), asker)
    await send_message(ep, conn, "state", meta, arrays)

async def fetch_state(ep: Endpoint, peer: str, address: str, timeout_s: float) -> StateSnapshot:
    """Download `peer`'s committed state over a connection of its own.

    Args:
        timeout_s: cap on the whole download, plus twice the time the state's size needs at 10 Mbit/s once the
            donor said it (`meter.transfer_allowance_s`); each frame is also bounded by io_timeout_s.
    Returns:
        The donor's description (without the array list) and its arrays.
    Raises:
        PeerFailure: the donor is unreachable, stalls, has no state, or sends a malformed or corrupted state.
    """
    sock = await ep.dial(peer, address)
    try:
        start = asyncio.get_running_loop().time()
        async with asyncio.timeout(timeout_s) as deadline:
            await sock.send(encode_header(Header(kind="state_req", run=ep.run_id, sender=ep.peer_id)))
            meta, arrays = await read_message(
                ep, sock, peer, "state", ep.config.max_state_bytes,
                sized=lambda total: deadline.reschedule(start + timeout_s + transfer_allowance_s(total)))
        if "error" in meta:
            raise PeerFailure(peer, f"no state to give: {meta['error']}")
        return StateSnapshot(meta, arrays)
    except (FrameError, ConnectionError, OSError, TimeoutError, ValueError, TypeError, KeyError) as e:
        why = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise PeerFailure(peer, f"state download failed: {why}") from None
    finally:
        sock.close()


async def serve_calls(ep: Endpoint, conn: Link, asker: str, first: Header) -> None:
    """Answer `call` messages on their own connection, one after the other, until it closes."""
    h: Header | None = first
    while h is not None:
        meta, arrays = await read_message(ep, conn, asker, "call", ep.config.max_call_bytes, first=h)
        handler = ep.call_handler
        if handler is None:
            reply: tuple[dict[str, Any], dict[str, np.ndarray]] = ({"error": f"{ep.peer_id} takes no calls"}, {})
        else:
            try:
                reply = await handler(asker, meta, arrays)
            except Exception as e:  # noqa: BLE001 - the caller gets the error; this peer goes on
                log.warning("data plane: call from %s failed: %s: %s", asker, type(e).__name__, e)
                reply = ({"error": f"{type(e).__name__}: {e}"}, {})
        await send_message(ep, conn, "reply", *reply)
        del meta, arrays, reply  # nothing of one call is held while the connection waits for the next
        h = await ep.read_header(conn, ep.config.idle_timeout_s)  # the caller redials a closed one

async def call(ep: Endpoint, peer: str, address: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
               timeout_s: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send a request to `peer`'s call handler and return its reply (description, arrays).

    Connections are kept for the next call to the same peer; concurrent calls use several.
    The reply may hold an "error" entry: the handler's refusal, for the caller to interpret.

    Args:
        timeout_s: cap on the whole call, the handler's work included.
    Raises:
        PeerFailure: the peer is unreachable, broke the connection, stalled past `timeout_s`, or
            replied with a malformed message.
    """
    idle = ep._idle_calls.setdefault(peer, [])
    for fresh in (False, True):
        reused = bool(idle) and not fresh
        sock = idle.pop() if reused else await ep.dial(peer, address)
        ok = False
        try:
            async with asyncio.timeout(timeout_s):
                await send_message(ep, sock, "call", meta, arrays)
                reply = await read_message(ep, sock, peer, "reply", ep.config.max_call_bytes)
            ok = True
            return reply
        except (FrameError, ConnectionError, OSError, TimeoutError) as e:
            if reused and not isinstance(e, TimeoutError):
                continue  # the peer may have closed an idle connection: try once on a new one
            why = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            raise PeerFailure(peer, f"call failed: {why}") from None
        finally:
            if ok and len(idle) < _IDLE_CALLS_PER_PEER:
                idle.append(sock)
            else:
                sock.close()
    raise AssertionError("unreachable")
