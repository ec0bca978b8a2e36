"""This peer's upload rate, measured on the round data it sends: what the coordinator splits the parts by.

A member's part of the all-reduce is sized by its bandwidth (`swarm.allreduce.reduce.partition`): it receives
that part from every other member and sends the reduced part back. The rate is the bytes of large frames sent
over the time at least one of them was being sent (concurrent sends share the uplink, so their time counts
once), smoothed over the last few busy periods. Small frames are left out: the kernel's socket buffer takes them
at once, which would measure memory, not the link.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIN_FRAME_BYTES = 256 * 1024
"""Frames below this are not timed."""
DECAY = 0.7
"""Weight each earlier busy period keeps when a new one ends (about the last three count)."""


class UploadMeter:
    """Times the sends of large frames; `rate` is bytes per second while sending (0: nothing timed yet)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._active = 0
        self._since = 0.0
        self._pending = 0
        self._bytes = 0.0
        self._seconds = 0.0

    def start(self, n: int) -> bool:
        """A frame of `n` bytes starts going out; returns whether it is timed (pass it to `done`)."""
        if n < MIN_FRAME_BYTES:
            return False
        if self._active == 0:
            self._since = self._clock()
        self._active += 1
        return True

    def done(self, n: int, sent: bool = True) -> None:
        """A timed frame of `n` bytes is out (`sent`), or failed (its bytes do not count)."""
        self._active -= 1
        self._pending += n if sent else 0
        if self._active == 0:
            busy = self._clock() - self._since
            if self._pending and busy > 0:
                self._bytes = self._bytes * DECAY + self._pending
                self._seconds = self._seconds * DECAY + busy
            self._pending = 0

    @property
    def rate(self) -> float:
        return self._bytes / self._seconds if self._seconds > 0 else 0.0


MIN_LINK_BYTES_PER_S = 1.25e6
"""The slowest link an all-reduce allows time for (10 Mbit/s): a fixed deadline would abort every round of a
model whose payload takes longer than it to cross a home link."""
TRANSFER_MARGIN = 2.0


def transfer_allowance_s(payload_bytes: int, rate: float = 0.0) -> float:
    """Time to add to a deadline for moving `payload_bytes` at `rate` bytes/s (the slowest member's measured upload;
    0: not measured), twice over. A rate under MIN_LINK_BYTES_PER_S counts as that, so nobody can stretch a
    deadline without bound by declaring a slow link."""
    return TRANSFER_MARGIN * payload_bytes / max(rate, MIN_LINK_BYTES_PER_S)
