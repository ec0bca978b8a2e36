"""Contract test of the coordinator's state stores (STYLE 13): one base class, one subclass per store.

`make_store` opens a fresh store under tmp_path; `reopen` gives the store a
restarted coordinator would get (for memory: a new MemoryStore holding a
deep copy, for SQLite: close, then open the same file).
"""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import Arrive, Commit, Event, Heartbeat, Join, Tick, decide
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.coordinator.state import Capabilities, Decision, Member, Progress, Round, RunState
from swarm.coordinator.store import MemoryStore, SqliteStore, Store

RUN = "store-run"


def member(peer: str, *, stage: int = 0, lease: float = 100.0, step: int = 0) -> Member:
    return Member(
        peer_id=peer,
        incarnation=f"{peer}-1",
        address=f"{peer}.example:7000",
        stage=stage,
        capabilities=Capabilities(device="cuda:0", flops=3.5e14, bandwidth_bytes_per_s=1.25e9, memory_bytes=80 << 30),
        joined_at=1.5,
        lease_expires_at=lease,
        progress=Progress(step=step, loss=2.75, tokens_per_s=1234.5, stage_grad_norms=(0.25, 1e-3)),
    )


def running_round(stage: int = 0, number: int = 0) -> Round:
    return Round(
        stage=stage,
        number=number,
        phase="running",
        opened_at=2.0,
        arrived=("b", "a"),
        barrier_deadline=32.0,
        attempt=2,
        members=("a", "b"),
        attempt_deadline=92.5,
        commits=(("b", "00ff00ff"),),
        reasons=("attempt 1 with 2 members: all arrived", "attempt 2 with 2 members: retry"),
    )


def gathering_round(stage: int = 0, number: int = 1) -> Round:
    # barrier_deadline None: waits for the previous round, and must round-trip as None
    return Round(stage=stage, number=number, phase="gathering", opened_at=3.0, arrived=("a",))


class StoreContract:
    """Every Store must pass these; subclasses say how to open and reopen one."""

    @pytest.fixture(autouse=True)
    def _close_opened(self) -> object:
        self.opened: list[Store] = []
        yield
        for store in self.opened:
            with contextlib.suppress(sqlite3.ProgrammingError):
                store.close()

    def make_store(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    def reopen(self, store: Store) -> Store:
        """The store a coordinator restarted after `store` would open."""
        raise NotImplementedError

    def _track(self, store: Store) -> Store:
        self.opened.append(store)
        return store

    # ------------------------------------------------------------------ tests

    def test_new_store_is_empty(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        assert store.state == RunState(run_id=RUN)

    def test_commit_puts_members_rounds_and_tombstones(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="join", put_members=(member("a"), member("b", stage=1))))
        store.commit(Decision(reason="rounds", put_rounds=(running_round(), gathering_round())))
        store.commit(Decision(reason="gone", drop_members=("b",), tombstones=(("b", 50.0),)))
        assert store.state.members == {"a": member("a")}
        assert store.state.rounds == {(0, 0): running_round(), (0, 1): gathering_round()}
        assert store.state.tombstones == {"b": 50.0}

    def test_later_puts_replace_earlier_ones(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"),), put_rounds=(running_round(),)))
        done = replace(running_round(), phase="committed", committed_hash="00ff00ff", donor="b", finished_at=9.0)
        store.commit(Decision(reason="", put_members=(member("a", step=5),), put_rounds=(done,)))
        assert store.state.members["a"].progress.step == 5
        assert store.state.rounds == {(0, 0): done}

    def test_rejoin_clears_tombstone(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", tombstones=(("a", 10.0),)))
        store.commit(Decision(reason="", put_members=(member("a"),)))
        assert store.state.tombstones == {}
        # drop + tombstone + put of the same id in one decision (a new incarnation replacing an expired one)
        store.commit(Decision(reason="", drop_members=("a",), tombstones=(("a", 20.0),), put_members=(member("a"),)))
        assert set(store.state.members) == {"a"} and store.state.tombstones == {}
        reopened = self.reopen(store)
        assert reopened.state.tombstones == {}

    def test_state_survives_flush_and_reopen(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"), member("b"), member("c", stage=3))))
        store.commit(Decision(reason="", put_rounds=(running_round(), gathering_round(), running_round(stage=3))))
        store.commit(Decision(reason="", drop_members=("c",), tombstones=(("c", 77.25),)))
        # a heartbeat: not durable, so a store may batch it until flush()
        store.commit(Decision(reason="", put_members=(member("a", lease=140.0, step=9),), durable=False))
        store.flush()
        expected = copy.deepcopy(store.state)
        reopened = self.reopen(store)
        assert reopened.state == expected
        assert reopened.state.members["a"].progress.stage_grad_norms == (0.25, 1e-3)
        assert reopened.state.rounds[(0, 1)].barrier_deadline is None
        assert reopened.state.rounds[(0, 0)].commits == (("b", "00ff00ff"),)

    def test_close_flushes_batched_changes(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"),)))
        store.commit(Decision(reason="", put_members=(member("a", lease=500.0, step=3),), durable=False))
        expected = copy.deepcopy(store.state)
        reopened = self.reopen(store)  # reopen closes first; close must flush
        assert reopened.state == expected

    def test_decisions_of_a_real_run_round_trip(self, tmp_path: Path) -> None:
        config = CoordinatorConfig(run_id=RUN, lease_s=10.0, heartbeat_interval_s=1.0, rendezvous_timeout_s=5.0)
        store = self.make_store(tmp_path)
        events: list[tuple[float, Event]] = []
        for p in ("a", "b", "c"):
            events.append((0.0, Join(RUN, p, PROTOCOL_VERSION, f"{p}.example:7000", Capabilities(), 0, f"{p}-1")))
        events += [(1.0, Arrive(RUN, p, f"{p}-1", 0, 0)) for p in ("a", "b", "c")]
        events += [
            (2.0, Commit(RUN, "a", "a-1", 0, 0, 1, "aaaaaaaa")),
            (2.0, Commit(RUN, "b", "b-1", 0, 0, 1, "aaaaaaaa")),
        ]
        events += [(3.0, Commit(RUN, "c", "c-1", 0, 0, 1, "cccccccc"))]
        events += [(4.0, Heartbeat(RUN, p, f"{p}-1", Progress(step=1, loss=1.0))) for p in ("a", "b")]
        events += [(4.0, Arrive(RUN, "a", "a-1", 0, 1)), (13.0, Tick())]  # c's lease ends at 10
        for now, event in events:
            store.commit(decide(store.state, now, event, config))
        assert store.state.rounds[(0, 0)].diverged == ("c",)
        assert store.state.tombstones == {"c": 10.0}
        store.flush()
        expected = copy.deepcopy(store.state)
        assert self.reopen(store).state == expected


class TestMemoryStore(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return self._track(MemoryStore(RUN))

    def reopen(self, store: Store) -> Store:
        fresh = MemoryStore(store.state.run_id)
        fresh.state = copy.deepcopy(store.state)
        return self._track(fresh)


class TestSqliteStore(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return self._track(SqliteStore(tmp_path / "coordinator.db", RUN))

    def reopen(self, store: Store) -> Store:
        assert isinstance(store, SqliteStore)
        store.close()
        return self._track(SqliteStore(store.path, RUN))

    def test_durable_decisions_survive_a_crash_without_flush(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"), member("b"))))
        store.commit(Decision(reason="", put_rounds=(running_round(),)))
        store.commit(Decision(reason="", drop_members=("b",), tombstones=(("b", 5.0),)))
        # no flush, no close: a second coordinator opens the file the first one left behind
        survivor = self._track(SqliteStore(tmp_path / "coordinator.db", RUN))
        assert survivor.state == store.state

    def test_heartbeats_are_batched_until_flush(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"),)))
        store.commit(Decision(reason="", put_members=(member("a", lease=300.0, step=4),), durable=False))
        path = tmp_path / "coordinator.db"
        assert self._track(SqliteStore(path, RUN)).state.members["a"] == member("a")
        store.flush()
        assert self._track(SqliteStore(path, RUN)).state.members["a"] == member("a", lease=300.0, step=4)

    def test_refuses_a_file_of_another_run(self, tmp_path: Path) -> None:
        path = tmp_path / "coordinator.db"
        self.make_store(tmp_path).close()
        with pytest.raises(ValueError, match="other-run") as info:
            SqliteStore(path, "other-run")
        assert repr(RUN) in str(info.value) and "'other-run'" in str(info.value)
        assert self._track(SqliteStore(path, RUN)).state == RunState(run_id=RUN)  # the file is intact

    def test_refuses_an_unknown_schema(self, tmp_path: Path) -> None:
        path = tmp_path / "coordinator.db"
        self.make_store(tmp_path).close()
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        with pytest.raises(ValueError, match="schema 99"):
            SqliteStore(path, RUN)

    def test_failed_write_changes_neither_state_nor_file(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.commit(Decision(reason="", put_members=(member("a"), member("b"))))
        before = copy.deepcopy(store.state)
        unwritable = replace(member("c"), capabilities=Capabilities(device=object()))  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            store.commit(Decision(reason="", drop_members=("b",), put_members=(unwritable,)))
        assert store.state == before
        # the drop that ran before the failing put was rolled back with it
        assert self._track(SqliteStore(tmp_path / "coordinator.db", RUN)).state == before
