"""What arrives for one (round, attempt): payloads by (kind, sender), and the memory they land in.

The transport knows payloads only as bytes: a sender's `contrib` or `result` payload of a declared
size and tag. What they mean (parts, codecs) is the all-reduce's business; it tells the inbox what
it expects (`expect`), and frames that do not fit are refused with the sender named.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swarm.transport.frames import FrameError

Key = tuple[str, str]
"""(kind, sender) of a payload."""
_POOL_PER_SIZE = 8
"""Free buffers kept per (size, dtype): enough for the payloads of a few attempts."""


class PeerFailure(Exception):
    """A remote peer failed (unreachable, broke a connection, stalled or sent garbage)."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class BufferPool:
    """Uninitialised arrays reused across attempts.

    Reuse matters: fresh large arrays cost the kernel a page fault and a zeroed page per 4 KiB on
    first touch, which was the largest single cost of a round. A buffer handed out is known by its
    address until given back, so a torch tensor made from it (`torch.from_numpy`) can be given back too.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, str], list[np.ndarray]] = {}
        self._lent: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    def take(self, numel: int, dtype: np.dtype | str) -> np.ndarray:
        free = self._free.get((numel, np.dtype(dtype).str))
        array = free.pop() if free else np.empty(numel, dtype=dtype)
        if array.size:
            self._lent[array.ctypes.data] = array
        return array

    def give(self, array: Any) -> None:
        """Take back `array` (an ndarray or tensor over a whole buffer from `take`); anything else is ignored."""
        address = array.data_ptr() if hasattr(array, "data_ptr") else array.ctypes.data
        nbytes = array.nbytes
        own = self._lent.get(address)
        if own is None or own.nbytes != nbytes:
            return  # not ours, given back already, or a part of a buffer
        del self._lent[address]
        free = self._free.setdefault((own.size, own.dtype.str), [])
        if len(free) < _POOL_PER_SIZE:
            free.append(own)


@dataclass(slots=True)
class Inbox:
    """The payloads of one (round, attempt), as they arrive."""

    round: int
    attempt: int
    mail: dict[Key, np.ndarray] = field(default_factory=dict)
    """(kind, sender) -> its payload's bytes (complete once `left` is 0)."""
    tags: dict[Key, str] = field(default_factory=dict)
    left: dict[Key, int] = field(default_factory=dict)
    """Bytes each payload still owes."""
    spans: dict[Key, list[tuple[int, int]]] = field(default_factory=dict)
    """The byte ranges of each payload that landed so far, disjoint and in order (`arrived`)."""
    expected: dict[Key, tuple[int, str]] = field(default_factory=dict)
    """(size, tag) of each payload the attempt waits for (set by `expect`)."""
    failed: dict[str, str] = field(default_factory=dict)
    started: bool = False
    pending_bytes: int = 0
    """Bytes allocated for frames that came before the attempt started (bounded by the endpoint)."""
    pending_by: dict[str, int] = field(default_factory=dict)
    """The same per sender (bounded per sender too)."""
    buffers: list[np.ndarray] = field(default_factory=list)
    """What goes back to the pool with the inbox: what it allocated and what it was given (`own`)."""
    writing: int = 0
    """Payloads being received into this inbox's buffers right now."""
    closed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, peer: str, reason: str) -> None:
        self.failed.setdefault(peer, reason)
        self.changed.set()

    def owes(self, peer: str) -> bool:
        """Whether `peer` may still owe data (before the attempt started, anyone may)."""
        return not self.started or any(n > 0 for (_, p), n in self.left.items() if p == peer)

    def own(self, buffer: np.ndarray) -> np.ndarray:
        """Recycle `buffer` with the inbox (after the last frame landing in it), unless `keep` takes it back."""
        self.buffers.append(buffer)
        return buffer

    def keep(self, buffer: np.ndarray) -> None:
        """The caller keeps `buffer` (a result it returns): the inbox must not recycle it."""
        self.buffers = [b for b in self.buffers if b is not buffer]

    def expect(self, kind: str, sender: str, size: int, tag: str, into: np.ndarray | None = None) -> None:
        """`sender` owes a `kind` payload of `size` bytes tagged `tag`, to land in `into` when given.

        A payload that came early with another size or tag fails its sender (the attempt names it).
        """
        key = (kind, sender)
        self.expected[key] = (size, tag)
        got = self.mail.get(key)
        if got is None:
            self.left[key] = size
            if into is not None:
                self.mail[key], self.tags[key] = into.view(np.uint8).reshape(-1), tag
        elif got.size != size or self.tags[key] != tag:
            self.fail(sender, f"sent a {kind} payload of {got.size} bytes ({self.tags[key] or 'untagged'}), "
                              f"not the {size} bytes ({tag}) this attempt expects")

    def payload(self, kind: str, sender: str) -> np.ndarray:
        """The bytes `sender` delivered as its `kind` payload."""
        return self.mail[(kind, sender)]

    def delivered(self, kind: str, senders: list[str]) -> bool:
        return all(self.left.get((kind, p), 1) <= 0 for p in senders)

    def sink(self, kind: str, sender: str, total: int, tag: str,
             allocate: Callable[[Inbox, str, int], np.ndarray]) -> np.ndarray:
        """The buffer a frame of `sender`'s `kind` payload of `total` bytes lands in.

        Raises:
            FrameError: the payload is not one the started attempt expects, or not of its size or tag.
        """
        key = (kind, sender)
        buf = self.mail.get(key)
        if buf is None:
            if self.started:
                size, want = self.expected.get(key, (-1, ""))
                if size < 0:
                    raise FrameError(f"{sender} sent a {kind} payload that round {self.round} attempt "
                                     f"{self.attempt} does not expect from it")
                if (total, tag) != (size, want):
                    raise FrameError(f"{sender} sent a {kind} payload of {total} bytes ({tag or 'untagged'}), "
                                     f"not the {size} bytes ({want}) expected")
            buf = self.mail[key] = self.own(allocate(self, sender, total))
            self.tags[key], self.left[key] = tag, total
        elif buf.size != total or self.tags[key] != tag:
            raise FrameError(f"frame from {sender} does not match its {kind} payload in round {self.round}")
        return buf

    def arrived(self, kind: str, sender: str, start: int, end: int) -> bool:
        """Whether every byte in [start, end) of `sender`'s `kind` payload has landed (a piece of it is
        used before the rest arrives: the all-reduce's pipelined parts)."""
        return end <= start or any(lo <= start and end <= hi for lo, hi in self.spans.get((kind, sender), ()))

    def landed(self, kind: str, sender: str, offset: int, nbytes: int) -> None:
        """A frame's bytes [offset, offset + nbytes) landed; bytes that had landed already count once (a frame
        sent twice cannot make a payload look complete with bytes that never came)."""
        key, end = (kind, sender), offset + nbytes
        lo, hi = offset, end
        new, merged = nbytes, []
        for a, b in self.spans.get(key, ()):  # disjoint, in order
            if b < offset or a > end:
                merged.append((a, b))
                continue
            new -= max(0, min(b, end) - max(a, offset))
            lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self.spans[key] = sorted(merged)
        self.left[key] -= new
        self.changed.set()  # whoever waits for a piece or the whole payload looks again

    async def wait(self, done: Callable[[], bool], expected: list[str], deadline: float,
                   late: Callable[[str], bool] | None = None) -> None:
        """Wait until `done()`; raise PeerFailure for the first expected peer that failed or is late.

        Args:
            late: whether a peer still owes what `done` waits for (default `owes`); names the culprit at
                the deadline, so a peer that already delivered this phase is not blamed for another's stall.
        Raises:
            PeerFailure: an expected peer failed, or `deadline` (loop time) passed.
        """
        loop = asyncio.get_running_loop()
        while True:
            for peer in expected:
                if peer in self.failed:
                    raise PeerFailure(peer, self.failed[peer])
            if done():
                return
            left = deadline - loop.time()
            if left <= 0:
                overdue = [p for p in expected if (late or self.owes)(p)] or expected
                raise PeerFailure(overdue[0], f"no data by the deadline (round {self.round} attempt {self.attempt})")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
