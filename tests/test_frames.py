"""Data-plane frame codec and the fault-injection rules: pure functions, no sockets.

Every malformed input must surface as a `FrameError` whose message names the
problem (the endpoint logs it and drops the connection); any other exception
would escape the connection's reader task.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.transport.faults import POINTS, FaultInjector, FaultRule
from swarm.transport.frames import (
    KINDS,
    MAGIC,
    MAX_HEADER_BYTES,
    PAYLOAD_KINDS,
    PREFIX,
    VERSION,
    FrameError,
    Header,
    checksum,
    decode_header,
    decode_prefix,
    encode_header,
)

FIELDS = list(Header.__dataclass_fields__)
INT_FIELDS = ["round", "attempt", "part", "offset", "total", "nbytes", "checksum"]
STR_FIELDS = ["kind", "run", "sender", "tag"]
BIG = 1 << 62
"""A payload limit no generated header reaches."""

# ------------------------------------------------------------------ strategies

_names = st.text(max_size=24)  # at most 96 UTF-8 bytes, well inside the decoder's 1024-byte string limit
_u64 = st.integers(0, 2**64 - 1)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    """A valid header of any kind, its bytes inside the payload it declares where it has one."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    common: dict[str, Any] = {
        "kind": kind, "run": draw(_names), "sender": draw(_names), "round": draw(_u64), "attempt": draw(_u64),
        "part": draw(_u64), "checksum": draw(_u64), "tag": draw(_names),
    }
    if kind in PAYLOAD_KINDS:
        total = draw(st.integers(0, BIG))
        offset = draw(st.integers(0, total))
        return Header(**common, offset=offset, total=total, nbytes=draw(st.integers(0, total - offset)))
    return Header(**common, offset=draw(_u64), total=draw(_u64), nbytes=draw(st.integers(0, BIG)))


def _values(h: Header) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in (getattr(h, f) for f in FIELDS)]


_msgpack_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=6)
    | st.binary(max_size=3) | st.sampled_from([*sorted(KINDS), -1, 0, 1])
)
_msgpack_values = st.recursive(_msgpack_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@st.composite
def mangled_bodies(draw: st.DrawFn) -> bytes:
    """Header bodies near the valid ones: a field replaced, fields added or removed, bytes flipped, or noise."""
    how = draw(st.sampled_from(["replace", "count", "flip", "noise", "list"]))
    values = _values(draw(headers()))
    if how == "replace":
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, len(values) - 1))] = draw(_msgpack_values)
    elif how == "count":
        values = values[: draw(st.integers(0, len(values)))] + draw(st.lists(_msgpack_values, max_size=3))
    elif how == "list":
        values = draw(st.lists(_msgpack_values, min_size=len(FIELDS), max_size=len(FIELDS)))
    if how == "noise":
        return draw(st.binary(max_size=300))
    body = bytearray(msgpack.packb(values, use_bin_type=True))
    if how == "flip" and body:
        for _ in range(draw(st.integers(1, 4))):
            body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
    return bytes(body)


def _assert_valid(h: Header, max_payload_bytes: int) -> None:
    """What a decoded header promises the endpoint (which indexes dicts and sizes buffers with it)."""
    assert h.kind in KINDS
    assert all(type(getattr(h, f)) is str for f in STR_FIELDS)
    assert all(type(getattr(h, f)) is int and getattr(h, f) >= 0 for f in INT_FIELDS)
    assert h.nbytes <= max_payload_bytes
    if h.kind in PAYLOAD_KINDS:
        assert h.offset + h.nbytes <= h.total


# ------------------------------------------------------------------ round trips


@given(headers())
def test_header_round_trip(h: Header) -> None:
    frame = encode_header(h)
    assert frame[:4] == MAGIC
    assert decode_prefix(frame[: PREFIX.size]) == len(frame) - PREFIX.size
    decoded = decode_header(frame[PREFIX.size :], max_payload_bytes=max(h.nbytes, 1))
    assert decoded == h
    _assert_valid(decoded, max(h.nbytes, 1))


@given(st.binary(min_size=1, max_size=4096))
def test_checksum_detects_a_flipped_byte(payload: bytes) -> None:
    damaged = bytearray(payload)
    damaged[len(payload) // 2] ^= 0x01
    assert checksum(payload) == checksum(memoryview(payload))
    assert checksum(bytes(damaged)) != checksum(payload)


# ------------------------------------------------------------------ prefix errors


@pytest.mark.parametrize(
    ("prefix", "word"),
    [
        (b"", "truncated"),
        (PREFIX.pack(MAGIC, VERSION, 10)[:-1], "truncated"),
        (PREFIX.pack(MAGIC, VERSION, 10) + b"x", "truncated"),
        (PREFIX.pack(b"HTTP", VERSION, 10), "magic"),
        (b"GET / HTTP/1.1"[: PREFIX.size], "magic"),
        (PREFIX.pack(MAGIC, VERSION + 1, 10), "version"),
        (PREFIX.pack(MAGIC, 0, 10), "version"),
        (PREFIX.pack(MAGIC, VERSION, MAX_HEADER_BYTES + 1), "exceeds"),
        (PREFIX.pack(MAGIC, VERSION, 2**32 - 1), "exceeds"),
    ],
    ids=["empty", "short", "long", "magic", "http", "newer-version", "older-version", "header-len", "header-len-max"],
)
def test_bad_prefix_is_rejected(prefix: bytes, word: str) -> None:
    with pytest.raises(FrameError, match=word):
        decode_prefix(prefix)


def test_prefix_at_the_header_limit_is_accepted() -> None:
    assert decode_prefix(PREFIX.pack(MAGIC, VERSION, MAX_HEADER_BYTES)) == MAX_HEADER_BYTES
    assert decode_prefix(PREFIX.pack(MAGIC, VERSION, 0)) == 0


@given(st.binary(min_size=PREFIX.size, max_size=PREFIX.size))
def test_decode_prefix_of_arbitrary_bytes(prefix: bytes) -> None:
    try:
        n = decode_prefix(prefix)
    except FrameError:
        assert prefix[:4] != MAGIC or prefix[4] != VERSION or int.from_bytes(prefix[5:], "big") > MAX_HEADER_BYTES
    else:
        assert prefix[:5] == MAGIC + bytes([VERSION]) and 0 <= n <= MAX_HEADER_BYTES


def test_encode_refuses_an_oversized_header() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        encode_header(Header(kind="hello", tag="x" * (MAX_HEADER_BYTES + 1)))


# ------------------------------------------------------------------ header errors

_GOOD = Header(kind="contrib", run="r", sender="a", round=3, attempt=1, part=2, offset=100, total=1000, tag="int8",
               nbytes=200, checksum=7)
_LIMIT = 1 << 20


def _body(**overrides: Any) -> bytes:
    d = dict(zip(FIELDS, _values(_GOOD), strict=True))
    d.update(overrides)
    return msgpack.packb(list(d.values()), use_bin_type=True)


def test_the_base_header_of_the_error_cases_is_valid() -> None:
    assert decode_header(_body(), _LIMIT) == _GOOD


@pytest.mark.parametrize(
    ("body", "word"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (_body()[:-3], "malformed"),
        (_body() + b"\x00", "malformed"),
        (msgpack.packb({"kind": "hello"}), "malformed"),
        (msgpack.packb([0] * (len(FIELDS) + 1)), "max_array_len"),
        (msgpack.packb(_values(_GOOD)[:-1]), f"{len(FIELDS)} fields"),
        (msgpack.packb([]), f"{len(FIELDS)} fields"),
        (msgpack.packb(5), f"{len(FIELDS)} fields"),
        (msgpack.packb("contrib"), f"{len(FIELDS)} fields"),
        (_body(run="x" * 2000), "max_str_len"),
        (_body(run=b"bytes"), "max_bin_len"),
        (_body(total=-1), "negative"),
        (_body(round=-(2**63)), "negative"),
        (_body(offset=True), "non-integer"),
        (_body(attempt=False), "non-integer"),
        (_body(total=1000.0), "non-integer"),
        (_body(nbytes="200"), "non-integer"),
        (_body(checksum=None), "non-integer"),
        (_body(part=[1]), "non-integer"),
        (_body(kind="gossip"), "kind"),
        (_body(kind=""), "kind"),
        (_body(kind=["contrib"]), "non-string"),
        (_body(kind=1), "non-string"),
        (_body(sender=["a"]), "non-string"),
        (_body(run=None), "non-string"),
        (_body(tag=0), "non-string"),
        (_body(tag=["int8"]), "non-string"),
        (_body(nbytes=_LIMIT + 4, total=2**30), "limit"),
        (_body(offset=900), "outside"),
        (_body(nbytes=901), "outside"),
        (_body(total=299), "outside"),
        (_body(kind="reply", offset=1000, nbytes=1), "outside"),
    ],
    ids=lambda v: None if isinstance(v, str) else "",
)
def test_bad_header_is_rejected(body: bytes, word: str) -> None:
    with pytest.raises(FrameError, match=word):
        decode_header(body, _LIMIT)


def test_payload_limit_applies_to_every_kind() -> None:
    for kind in sorted(KINDS):
        h = replace(_GOOD, kind=kind, total=_LIMIT, offset=0)
        body = encode_header(replace(h, nbytes=_LIMIT))[PREFIX.size :]
        assert decode_header(body, _LIMIT).nbytes == _LIMIT  # exactly at the limit is fine
        with pytest.raises(FrameError, match="limit"):
            decode_header(body, _LIMIT - 1)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mangled_bodies())
def test_decode_header_of_arbitrary_bytes_is_valid_or_frame_error(body: bytes) -> None:
    try:
        h = decode_header(body, _LIMIT)
    except FrameError as e:
        assert str(e)
    else:
        _assert_valid(h, _LIMIT)


# ------------------------------------------------------------------ fault rules


def test_from_json_parses_rules() -> None:
    text = json.dumps([
        {"point": "send.contrib", "action": "drop", "peer": "b", "round": 2, "attempt": 1, "after": 1, "times": 2},
        {"point": "recv.result", "action": "delay", "delay_s": 0.5, "times": 0, "probability": 0.25},
    ])
    faults = FaultInjector.from_json(text)
    assert faults
    rule = None
    for _ in range(2):
        rule = faults.hit("send.contrib", round=2, attempt=1, peer="b") or rule
    assert rule is not None
    assert (rule.action, rule.peer, rule.round, rule.attempt, rule.after, rule.times) == ("drop", "b", 2, 1, 1, 2)


@pytest.mark.parametrize("text", ["", "  \n", "[]"])
def test_from_json_empty_means_no_faults(text: str) -> None:
    faults = FaultInjector.from_json(text)
    assert not faults
    assert all(faults.hit(p, round=0, attempt=0, peer="x") is None for p in POINTS)


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("[{", "bad fault rules"),
        ('{"point": "send.contrib", "action": "drop"}', "bad fault rules"),
        ("[1]", "bad fault rules"),
        ("null", "bad fault rules"),
        ('[{"point": "send.contrib"}]', "action"),
        ('[{"point": "send.contrib", "action": "drop", "colour": "red"}]', "colour"),
        ('[{"point": "send.hello", "action": "drop"}]', "fault point"),
        ('[{"point": "send.contrib", "action": "explode"}]', "fault action"),
    ],
)
def test_from_json_rejects_bad_rules(text: str, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        FaultInjector.from_json(text)


def test_rule_checks_point_and_action() -> None:
    with pytest.raises(ValueError, match="fault point 'nowhere'"):
        FaultRule(point="nowhere", action="drop")
    with pytest.raises(ValueError, match="fault action 'melt'"):
        FaultRule(point="recv.contrib", action="melt")  # type: ignore[arg-type]


def _fires(faults: FaultInjector, n: int, point: str = "send.contrib", **where: Any) -> list[bool]:
    where = {"round": 0, "attempt": 0, "peer": "b", **where}
    return [faults.hit(point, **where) is not None for _ in range(n)]


def test_after_skips_matches_then_times_limits_firing() -> None:
    faults = FaultInjector([FaultRule(point="send.contrib", action="drop", after=2, times=3)])
    assert _fires(faults, 8) == [False, False, True, True, True, False, False, False]


def test_times_zero_fires_forever_and_default_fires_once() -> None:
    always = FaultInjector([FaultRule(point="send.contrib", action="drop", times=0)])
    assert all(_fires(always, 50))
    once = FaultInjector([FaultRule(point="send.contrib", action="drop")])
    assert _fires(once, 4) == [True, False, False, False]


@pytest.mark.parametrize(
    ("field", "match", "miss"),
    [("round", {"round": 4}, {"round": 5}), ("attempt", {"attempt": 2}, {"attempt": 0}),
     ("peer", {"peer": "c"}, {"peer": "b"})],
)
def test_filters_select_frames_and_misses_do_not_count_towards_after(
    field: str, match: dict[str, Any], miss: dict[str, Any]
) -> None:
    faults = FaultInjector([FaultRule(point="send.result", action="corrupt", after=1, times=0, **match)])
    assert _fires(faults, 3, "send.result", **miss) == [False] * 3
    assert _fires(faults, 3, "send.result", **match) == [False, True, True]
    assert _fires(faults, 2, "send.result", **miss) == [False, False]
    assert _fires(faults, 2, "recv.result", **match) == [False, False]  # another point


def test_first_matching_rule_of_a_point_wins() -> None:
    first = FaultRule(point="recv.contrib", action="delay", delay_s=0.1, times=1)
    second = FaultRule(point="recv.contrib", action="close", times=0)
    faults = FaultInjector([first, second])
    assert [faults.hit("recv.contrib", round=0, attempt=0, peer="x") for _ in range(3)] == [first, second, second]


def test_probability_is_seeded() -> None:
    def run(seed: int) -> list[bool]:
        rule = FaultRule(point="gather.start", action="delay", times=0, probability=0.3)
        return _fires(FaultInjector([rule], seed=seed), 2000, "gather.start")

    a, b = run(1), run(1)
    assert a == b
    assert 450 < sum(a) < 750
    assert run(2) != a
    never = FaultInjector([FaultRule(point="gather.start", action="drop", times=0, probability=0.0)])
    assert not any(_fires(never, 100, "gather.start"))


def test_exit_rule_kills_the_process_without_cleanup() -> None:
    """Only in a child process: `exit` SIGKILLs whoever hits it."""
    code = textwrap.dedent("""
        import atexit, sys
        from swarm.transport.faults import FaultInjector, FaultRule
        atexit.register(lambda: print("cleanup ran", flush=True))
        faults = FaultInjector([FaultRule(point="reduce.done", action="exit", round=3)])
        print("miss", faults.hit("reduce.done", round=2, attempt=0), flush=True)
        faults.hit("reduce.done", round=3, attempt=0)
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout == "miss None\n"


def test_state_frames_stay_inside_their_declared_total() -> None:
    good = Header(kind="state", part=1, offset=10, total=15, nbytes=5)
    assert decode_header(encode_header(good)[PREFIX.size :], 100) == good
    for bad in (replace(good, total=14), replace(good, nbytes=6), replace(good, offset=11)):
        with pytest.raises(FrameError, match="state frame"):
            decode_header(encode_header(bad)[PREFIX.size :], 100)
