"""Messages on the data plane: a msgpack description and named arrays, as frames of one kind.

A message (kinds `state`, `call`, `reply`) travels on a connection of its own: part 0 carries the
description, then parts 1.. carry the arrays' bytes end to end in chunks. A receiver allocates only
what the description declares, within a limit, and checks every chunk's place and checksum.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from swarm.transport.frames import FrameError, Header, checksum, encode_header

if TYPE_CHECKING:
    from swarm.transport.endpoint import Endpoint

MAX_META_BYTES = 1 << 20
"""Largest description accepted."""
_DTYPES = frozenset({"float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool"})
"""Array dtypes a message may carry (never object arrays)."""


@dataclass(slots=True)
class _Frame:
    part: int
    offset: int
    nbytes: int
    total: int
    payload: memoryview


async def send_message(ep: Endpoint, conn: socket.socket, kind: str, meta: dict[str, Any],
                       arrays: dict[str, np.ndarray]) -> None:
    """Send one message on `conn`: the description, then the arrays' bytes in chunks."""
    loop = asyncio.get_running_loop()
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
            await loop.sock_sendall(conn, encode_header(header))
            await loop.sock_sendall(conn, payload)
        ep.bytes_sent += len(payload)


async def read_message(ep: Endpoint, sock: socket.socket, peer: str, kind: str, limit: int,
                       first: Header | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one message of `kind` from `peer` (its first header already read when `first` is given).

    Raises:
        FrameError: a malformed, misordered, corrupted or oversized message (over `limit` bytes
            of arrays), or arrays of a dtype outside the message dtypes.
        ConnectionError: the peer closed the connection mid-message.
    """
    head = await _read_frame(ep, sock, peer, kind, MAX_META_BYTES, first=first)
    if head.part != 0:
        raise FrameError(f"a {kind} message must start with its description")
    try:
        meta = msgpack.unpackb(bytes(head.payload), raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises many unrelated types for garbage
        raise FrameError(f"malformed {kind} description: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays", []), list):
        raise FrameError(f"{kind} description is not a map with an array list")
    arrays: dict[str, np.ndarray] = {}
    for spec in meta.pop("arrays", []):
        if (not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[0], str)
                or spec[1] not in _DTYPES or not isinstance(spec[2], list)
                or any(not isinstance(d, int) or d < 0 for d in spec[2])):
            raise FrameError(f"bad array description in a {kind} message: {str(spec)[:80]}")
        nbytes = int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize
        if nbytes > limit:
            raise FrameError(f"{kind} message of more than {limit} bytes")
        arrays[spec[0]] = np.empty(spec[2], dtype=np.dtype(spec[1]))
    total = sum(a.nbytes for a in arrays.values())
    if total > limit:
        raise FrameError(f"{kind} message of {total} bytes exceeds the limit of {limit}")
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


async def _read_frame(ep: Endpoint, sock: socket.socket, peer: str, kind: str, limit: int,
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
