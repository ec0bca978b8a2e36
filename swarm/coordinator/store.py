"""Where the coordinator's state lives: one interface, in-memory and SQLite.

A store owns the `RunState` and is its only writer: `commit(decision)`
persists the decision's changes and then applies them. Both implementations
pass the same contract test (tests/test_store.py).

SQLite runs in WAL mode with `synchronous=NORMAL`: a committed transaction
survives the coordinator process being killed (SIGKILL), which is the failure
this store is for; a power loss may lose the last transactions. Heartbeats
(`Decision.durable == False`) are batched and written by `flush()`, since a
restarted coordinator renews every lease anyway (`rounds.recover`).
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any

from swarm.coordinator.state import Capabilities, Decision, Member, Progress, Round, RunState, apply
from swarm.security.tokens import Enrollment

SCHEMA_VERSION = 1


class Store(ABC):
    """Holds the run's state and makes decisions durable."""

    state: RunState

    @abstractmethod
    def commit(self, decision: Decision) -> None:
        """Persist `decision` (durable ones before returning), then apply it to `self.state`."""

    @abstractmethod
    def token_uses(self, token_id: str) -> int:
        """Names enrolled with join token `token_id` so far (its uses)."""

    @abstractmethod
    def enrollment(self, name: str) -> Enrollment | None:
        """The join-token enrollment that issued a certificate for `name`, if any."""

    @abstractmethod
    def record_enrollment(self, enrollment: Enrollment) -> None:
        """Persist a new enrollment (one use of its token) before returning."""

    def flush(self) -> None:
        """Write batched non-durable changes (no-op where nothing is batched)."""

    def close(self) -> None:
        """Flush and release resources; the store is unusable afterwards."""


class MemoryStore(Store):
    """State in this process only: for tests, benchmarks and throwaway runs."""

    def __init__(self, run_id: str) -> None:
        self.state = RunState(run_id=run_id)
        self._enrollments: dict[str, Enrollment] = {}

    def commit(self, decision: Decision) -> None:
        apply(self.state, decision)

    def token_uses(self, token_id: str) -> int:
        return sum(e.token_id == token_id for e in self._enrollments.values())

    def enrollment(self, name: str) -> Enrollment | None:
        return self._enrollments.get(name)

    def record_enrollment(self, enrollment: Enrollment) -> None:
        self._enrollments[enrollment.name] = enrollment


def _member_to_json(m: Member) -> str:
    return json.dumps(asdict(m), separators=(",", ":"))


def _member_from_json(text: str) -> Member:
    d: dict[str, Any] = json.loads(text)
    d["capabilities"] = Capabilities(**d["capabilities"])
    p = d["progress"]
    p["stage_grad_norms"] = tuple(p["stage_grad_norms"])
    d["progress"] = Progress(**p)
    return Member(**d)


def _round_to_json(r: Round) -> str:
    return json.dumps(asdict(r), separators=(",", ":"))


def _round_from_json(text: str) -> Round:
    d: dict[str, Any] = json.loads(text)
    for key in ("arrived", "members", "diverged", "reasons", "checkpointed_by"):
        d[key] = tuple(d.get(key, ()))  # (checkpointed_by: absent from databases written before it)
    d["commits"] = tuple((p, h) for p, h in d["commits"])
    d["accusations"] = tuple((r, s, why) for r, s, why in d["accusations"])
    d["norms"] = tuple((p, float(n)) for p, n in d.get("norms", ()))
    d["refused"] = tuple((p, why) for p, why in d.get("refused", ()))
    d["directions"] = tuple((p, tuple(dots), float(sq), bool(a)) for p, dots, sq, a in d.get("directions", ()))
    return Round(**d)


class SqliteStore(Store):
    """State in a SQLite file; a coordinator restarted on the same file continues the run.

    Raises:
        ValueError: the file holds another run or an unknown schema version.
    """

    def __init__(self, path: str | Path, run_id: str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS members (peer_id TEXT PRIMARY KEY, data TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS rounds (
                stage INTEGER NOT NULL, number INTEGER NOT NULL, data TEXT NOT NULL,
                PRIMARY KEY (stage, number));
            CREATE TABLE IF NOT EXISTS tombstones (peer_id TEXT PRIMARY KEY, at REAL NOT NULL);
            -- Join tokens: one row per name issued; a token's uses are its rows. Added without a schema
            -- bump: an older file simply gets the empty table.
            CREATE TABLE IF NOT EXISTS enrollments (
                name TEXT PRIMARY KEY, token_id TEXT NOT NULL, key_sha256 TEXT NOT NULL, at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS enrollments_by_token ON enrollments (token_id);
            """
        )
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if not meta:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("run_id", run_id), ("schema", str(SCHEMA_VERSION))]
                )
        elif meta.get("run_id") != run_id:
            self._db.close()
            raise ValueError(
                f"{self.path} holds run {meta.get('run_id')!r}, not {run_id!r}; use another --db or set run_id"
            )
        elif meta.get("schema") != str(SCHEMA_VERSION):
            self._db.close()
            raise ValueError(f"{self.path} has schema {meta.get('schema')}, this swarm reads {SCHEMA_VERSION}")
        self.state = RunState(run_id=run_id)
        self.state.members = {
            m.peer_id: m for m in (_member_from_json(t) for (t,) in self._db.execute("SELECT data FROM members"))
        }
        self.state.rounds = {r.key: r for r in (_round_from_json(t) for (t,) in self._db.execute("SELECT data FROM rounds"))}
        self.state.tombstones = dict(self._db.execute("SELECT peer_id, at FROM tombstones"))
        self._dirty: set[str] = set()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def commit(self, decision: Decision) -> None:
        if not decision.durable:
            apply(self.state, decision)
            self._dirty.update(m.peer_id for m in decision.put_members)
            return
        with self._transaction():
            self._write(decision)
        apply(self.state, decision)

    def _write(self, d: Decision) -> None:
        db = self._db
        if d.drop_members:
            db.executemany("DELETE FROM members WHERE peer_id = ?", [(p,) for p in d.drop_members])
        if d.tombstones:  # before puts, in the same order as state.apply
            db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", d.tombstones)
        if d.put_members:
            db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?, ?)", [(m.peer_id, _member_to_json(m)) for m in d.put_members]
            )
            db.executemany("DELETE FROM tombstones WHERE peer_id = ?", [(m.peer_id,) for m in d.put_members])
        if d.put_rounds:
            db.executemany(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?)",
                [(r.stage, r.number, _round_to_json(r)) for r in d.put_rounds],
            )

    def token_uses(self, token_id: str) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM enrollments WHERE token_id = ?", (token_id,)).fetchone()
        return int(n)

    def enrollment(self, name: str) -> Enrollment | None:
        row = self._db.execute("SELECT name, token_id, key_sha256, at FROM enrollments WHERE name = ?",
                               (name,)).fetchone()
        return Enrollment(*row) if row else None

    def record_enrollment(self, enrollment: Enrollment) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO enrollments VALUES (?, ?, ?, ?)",
                             (enrollment.name, enrollment.token_id, enrollment.key_sha256, enrollment.at))

    def flush(self) -> None:
        if not self._dirty:
            return
        live = [self.state.members[p] for p in self._dirty if p in self.state.members]
        self._dirty.clear()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?, ?)", [(m.peer_id, _member_to_json(m)) for m in live]
            )

    def close(self) -> None:
        self.flush()
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def open_store(db: str | Path | None, run_id: str) -> Store:
    """A SQLite store at `db`, or an in-memory one when `db` is None."""
    return MemoryStore(run_id) if db is None else SqliteStore(db, run_id)
