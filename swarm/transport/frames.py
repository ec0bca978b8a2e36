"""Data-plane frames: a fixed prefix, a msgpack header, a raw payload.

    +-------+---------+------------+-------------------+-----------------+
    | magic | version | header_len |  header (msgpack) | payload (bytes) |
    | 4 B   | 1 B     | 4 B (BE)   |  header_len B     | header.nbytes B |
    +-------+---------+------------+-------------------+-----------------+

The payload is written straight from tensor memory and read straight into its
destination (see `endpoint.py`); only the small header is (de)serialised in
Python. Every size is checked against a limit before anything is allocated,
and the payload carries an XXH3-64 checksum, so a truncated, oversized or
corrupted frame is rejected with a `FrameError` naming what was wrong.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, fields
from typing import Literal

import msgpack
import xxhash

MAGIC = b"SWRM"
VERSION = 2
PREFIX = struct.Struct(">4sBI")
MAX_HEADER_BYTES = 64 * 1024

Kind = Literal["hello", "contrib", "result", "abort", "state_req", "state", "call", "reply"]
KINDS: frozenset[str] = frozenset({"hello", "contrib", "result", "abort", "state_req", "state", "call", "reply"})
"""`state_req` asks a donor for its committed state on a connection of its own; the donor answers on
that connection with a `state` message. `call` is a request to the peer's call handler (pipeline
stages: a microbatch's activations) on a connection of its own, answered by a `reply` message on it.

A message (kinds `state`, `call`, `reply`) is frames of that kind: part 0 carries the msgpack
description, then parts 1.. carry the arrays' bytes in chunks (`offset`/`nbytes` a byte range of
`total` bytes)."""
MESSAGE_KINDS: frozenset[str] = frozenset({"state", "call", "reply"})
PAYLOAD_KINDS: frozenset[str] = MESSAGE_KINDS | {"contrib", "result"}
"""Kinds whose frames carry a byte range of a declared payload."""


class FrameError(Exception):
    """A frame is malformed, too large, from another version, or corrupted."""


@dataclass(frozen=True, slots=True)
class Header:
    """What a frame carries: `nbytes` bytes at `offset` of a payload of `total` bytes.

    An all-reduce payload (kinds `contrib`, `result`) is addressed by (round, attempt, kind,
    sender); a receiver sizes its buffer from the first frame of a payload it has not started
    yet. `part` and `tag` belong to the reader (the all-reduce's part index and codec name, a
    message's description or arrays): the transport carries them and reads neither.
    """

    kind: Kind
    run: str = ""
    sender: str = ""
    round: int = 0
    attempt: int = 0
    part: int = 0
    offset: int = 0
    total: int = 0
    tag: str = ""
    nbytes: int = 0
    checksum: int = 0


_FIELDS = tuple(f.name for f in fields(Header))
_STRINGS = ("kind", "run", "sender", "tag")


def checksum(payload: memoryview | bytes) -> int:
    """XXH3-64 of the payload (tens of GB/s: cheap next to the network)."""
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(header: Header) -> bytes:
    """Prefix + msgpack header, ready to be followed by the payload."""
    body = msgpack.packb(list(asdict(header).values()), use_bin_type=True)
    if len(body) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    return PREFIX.pack(MAGIC, VERSION, len(body)) + body


def decode_prefix(prefix: bytes) -> int:
    """Check the fixed prefix; returns the header length.

    Raises:
        FrameError: wrong magic, wrong version or oversized header.
    """
    if len(prefix) != PREFIX.size:
        raise FrameError(f"truncated frame prefix: {len(prefix)} of {PREFIX.size} bytes")
    magic, version, header_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"not a swarm data-plane frame (magic {magic!r}); is something else talking to this port?")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this peer speaks {VERSION}; run the same swarm release everywhere")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    return header_len


def decode_header(body: bytes, max_payload_bytes: int) -> Header:
    """Parse and validate a header.

    Raises:
        FrameError: malformed msgpack, unknown kind, a byte range outside its payload,
            or a payload over `max_payload_bytes`.
    """
    try:
        values = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=0, max_str_len=1024,
                                 max_array_len=len(_FIELDS), max_map_len=0)
    except Exception as e:  # noqa: BLE001 - msgpack raises many unrelated types for garbage
        raise FrameError(f"malformed frame header: {e}") from None
    if not isinstance(values, list) or len(values) != len(_FIELDS):
        raise FrameError(f"frame header must be a list of {len(_FIELDS)} fields")
    d = dict(zip(_FIELDS, values, strict=True))
    # Checked before the set lookup below: an unhashable value there would raise TypeError, not FrameError.
    if any(not isinstance(d[k], str) for k in _STRINGS):
        raise FrameError(f"frame header has a non-string {'/'.join(_STRINGS)} field")
    if any(not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0 for k in _FIELDS if k not in _STRINGS):
        raise FrameError("frame header has a negative or non-integer size field")
    if d["kind"] not in KINDS:
        raise FrameError(f"unknown frame kind {d['kind']!r}")
    if d["nbytes"] > max_payload_bytes:
        raise FrameError(f"payload of {d['nbytes']} bytes exceeds the limit of {max_payload_bytes}")
    header = Header(**d)
    if header.kind in PAYLOAD_KINDS and header.offset + header.nbytes > header.total:
        raise FrameError(f"a {header.kind} frame's bytes lie outside the payload it declares")
    return header


class Idle(Exception):
    """A connection sent no frame for `idle_timeout_s`."""
