"""The coordinator at run time: decisions applied to a store, waiters woken, time ticking.

One asyncio loop owns this object (STYLE 9); nothing here blocks except the
store's short SQLite writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import Event, Tick, decide
from swarm.coordinator.rounds import recover
from swarm.coordinator.state import Decision, RunState
from swarm.coordinator.store import Store

log = logging.getLogger("swarm.coordinator")
MAX_EVENTS = 200


class Coordinator:
    """Applies decisions to the store and lets callers wait for a round to change.

    Args:
        config: the run's settings.
        store: holds the state; a restarted coordinator passes the same store file.
        clock: seconds since the epoch; tests pass a fake.
    """

    def __init__(self, config: CoordinatorConfig, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.started_at = clock()
        self.events: deque[tuple[float, str]] = deque(maxlen=MAX_EVENTS)
        self._waiters: dict[tuple[int, int], asyncio.Event] = {}
        self._commit(recover(store.state, self.started_at, config), self.started_at)

    @property
    def state(self) -> RunState:
        return self.store.state

    def handle(self, event: Event) -> Decision:
        """Decide and apply `event` now.

        Raises:
            CoordinatorError: the event is invalid; nothing changed.
        """
        now = self.clock()
        decision = decide(self.store.state, now, event, self.config)
        self._commit(decision, now)
        return decision

    def _commit(self, decision: Decision, now: float) -> None:
        if decision.empty:
            return
        before = {r.key: self.store.state.rounds.get(r.key) for r in decision.put_rounds}
        self.store.commit(decision)
        if decision.reason:
            self.events.append((now, decision.reason))
            log.info("%s", decision.reason)
        for rnd in decision.put_rounds:
            old = before[rnd.key]
            # Held calls answer differently only once the phase or attempt changes; waking them on
            # every arrival or commit costs a barrier of N peers O(N^2) wakeups.
            if old is not None and (old.phase, old.attempt) == (rnd.phase, rnd.attempt):
                continue
            waiter = self._waiters.pop(rnd.key, None)
            if waiter is not None:
                waiter.set()

    async def wait_round(self, key: tuple[int, int], timeout_s: float) -> None:
        """Return when round `key` changes or after `timeout_s`, whichever is first."""
        if timeout_s <= 0:
            return
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = self._waiters[key] = asyncio.Event()
        try:
            await asyncio.wait_for(waiter.wait(), timeout_s)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Tick deadlines and leases, and flush heartbeats, until cancelled."""
        next_flush = time.monotonic() + self.config.flush_interval_s
        while True:
            await asyncio.sleep(self.config.tick_interval_s)
            self.handle(Tick())
            if time.monotonic() >= next_flush:
                self.store.flush()
                next_flush = time.monotonic() + self.config.flush_interval_s
