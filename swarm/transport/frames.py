"""Data-plane frames: a fixed prefix, a msgpack header, a raw payload.

    +-------+---------+------------+-------------------+-----------------+
    | magic | version | header_len |  header (msgpack) | payload (bytes) |
    | 4 B   | 1 B     | 4 B (BE)   |  header_len B     | header.nbytes B |
    +-------+---------+------------+-------------------+-----------------+

The payload is written straight from tensor memory and read straight into its
destination (see `connection.py`); only the small header is (de)serialised in
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
VERSION = 1
PREFIX = struct.Struct(">4sBI")
MAX_HEADER_BYTES = 64 * 1024
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int8": 1, "float64": 8, "int32": 4}

Kind = Literal["hello", "contrib", "result", "abort", "state_req", "state", "call", "reply"]
KINDS: frozenset[str] = frozenset({"hello", "contrib", "result", "abort", "state_req", "state", "call", "reply"})
"""`state_req` asks a donor for its committed state on a connection of its own; the donor answers on
that connection with a `state` message. `call` is a request to the peer's call handler (pipeline
stages: a microbatch's activations) on a connection of its own, answered by a `reply` message on it.

A message (kinds `state`, `call`, `reply`) is frames of that kind: part 0 carries the msgpack
description, then parts 1.. carry the arrays' bytes in chunks (`offset`/`numel` a byte range of
`total` bytes)."""
MESSAGE_KINDS: frozenset[str] = frozenset({"state", "call", "reply"})


class FrameError(Exception):
    """A frame is malformed, too large, from another version, or corrupted."""


@dataclass(frozen=True, slots=True)
class Header:
    """What a frame carries; all-reduce frames address a chunk of one part.

    `offset`/`numel` place the chunk in the flat tensor of `total` elements;
    `part_start`/`part_len` are the owner's part, so a receiver can size its
    buffers from the first frame of an attempt it has not started yet.
    """

    kind: Kind
    run: str = ""
    sender: str = ""
    round: int = 0
    attempt: int = 0
    part: int = 0
    offset: int = 0
    numel: int = 0
    total: int = 0
    part_start: int = 0
    part_len: int = 0
    codec: str = "none"
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    checksum: int = 0


_FIELDS = tuple(f.name for f in fields(Header))


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
        FrameError: malformed msgpack, unknown kind or dtype, inconsistent sizes,
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
    # Checked before the set lookups below: an unhashable value there would raise TypeError, not FrameError.
    if any(not isinstance(d[k], str) for k in ("kind", "run", "sender", "codec", "dtype")):
        raise FrameError("frame header has a non-string kind, run, sender, codec or dtype field")
    ints = [k for k in _FIELDS if k not in ("kind", "run", "sender", "codec", "dtype", "shape")]
    if any(not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0 for k in ints):
        raise FrameError("frame header has a negative or non-integer size field")
    if d["kind"] not in KINDS:
        raise FrameError(f"unknown frame kind {d['kind']!r}")
    if d["dtype"] not in DTYPES:
        raise FrameError(f"unknown dtype {d['dtype']!r}; known: {sorted(DTYPES)}")
    if not isinstance(d["shape"], list) or any(not isinstance(s, int) or s < 0 for s in d["shape"]):
        raise FrameError("frame shape must be a list of non-negative integers")
    d["shape"] = tuple(d["shape"])
    if d["nbytes"] > max_payload_bytes:
        raise FrameError(f"payload of {d['nbytes']} bytes exceeds the limit of {max_payload_bytes}")
    header = Header(**d)
    if header.kind in ("contrib", "result"):
        if not header.part_start + header.part_len <= header.total:
            raise FrameError("chunk lies outside its part or the tensor")
        if header.codec == "none":
            if header.numel * DTYPES[header.dtype] != header.nbytes:
                raise FrameError(f"payload of {header.nbytes} bytes does not hold {header.numel} {header.dtype}")
            if not (header.part_start <= header.offset and header.offset + header.numel <= header.part_start + header.part_len):
                raise FrameError("chunk lies outside its part or the tensor")
        else:
            # An encoded part travels as bytes: offset/numel are a byte range of the part's payload,
            # whose length is shape[0]; no codec expands data beyond a few bytes per element.
            if header.dtype != "uint8" or len(header.shape) != 1 or header.numel != header.nbytes:
                raise FrameError("an encoded frame must carry uint8 bytes with shape (payload length,)")
            if header.shape[0] > 8 * header.part_len + 4096 or header.offset + header.numel > header.shape[0]:
                raise FrameError("chunk lies outside its encoded part, or the encoded part is implausibly large")
    if header.kind in MESSAGE_KINDS and (
        header.dtype != "uint8" or header.numel != header.nbytes or header.offset + header.numel > header.total
    ):
        raise FrameError(f"a {header.kind} frame must carry uint8 bytes inside its declared total")
    return header
