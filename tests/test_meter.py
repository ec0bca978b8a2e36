"""The upload meter: bytes of large frames over the time any of them was being sent."""

from __future__ import annotations

import itertools

import pytest

from swarm.transport.meter import DECAY, MIN_FRAME_BYTES, UploadMeter


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_concurrent_sends_share_the_uplink_and_their_time_counts_once() -> None:
    clock = _Clock()
    meter = UploadMeter(clock)
    n = 4 * MIN_FRAME_BYTES
    assert meter.start(n) and meter.start(n)  # two parts go out at once
    clock.t = 1.0
    meter.done(n)
    clock.t = 2.0
    meter.done(n)
    assert meter.rate == pytest.approx(2 * n / 2.0)


def test_small_frames_are_not_timed_and_failed_sends_do_not_count() -> None:
    clock = _Clock()
    meter = UploadMeter(clock)
    assert not meter.start(MIN_FRAME_BYTES - 1)
    assert meter.rate == 0.0
    assert meter.start(MIN_FRAME_BYTES)
    clock.t = 5.0
    meter.done(MIN_FRAME_BYTES, sent=False)
    assert meter.rate == 0.0


def test_the_rate_follows_the_link_over_a_few_busy_periods() -> None:
    clock = _Clock()
    meter = UploadMeter(clock)
    n = MIN_FRAME_BYTES
    seen = []
    for rate in [1e6] * 2 + [1e7] * 10:  # the link gets 10x faster
        meter.start(n)
        clock.t += n / rate
        meter.done(n)
        clock.t += 10.0  # idle time between rounds does not count
        seen.append(meter.rate)
    assert seen[:2] == pytest.approx([1e6, 1e6])
    assert all(a < b for a, b in itertools.pairwise(seen[1:]))  # rising towards the new rate
    assert 0.85e7 < seen[-1] < 1e7  # the slow periods keep DECAY ** 10 of their weight
    assert DECAY**10 < 0.03
