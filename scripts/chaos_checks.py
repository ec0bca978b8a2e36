"""The checks of a chaos run (scripts/chaos.py), read from the coordinator's SQLite file, peers' reports and logs.

Pure functions of what was recorded, so each can be tested on made-up records and each can fail:

- hangs: a round past its own deadline while the coordinator was up (`overdue`), a round that lived longer
  than its deadlines allow (`long_rounds`), a process that ignored SIGTERM (the harness counts those);
- divergence: a member that adopted a round with another hash than the one committed, a member left out of
  a committed round that offered a wrong hash again in its next commit (it never resynced), a member that held
  the last committed state and was outvoted (the run's state went back), survivors that end with different
  hashes (`divergences`, `final_hashes`);
- lost rounds: a round once seen committed (by a read of the database or by a peer told OK) that is later
  missing, not committed, or committed with another hash (`Ledger`);
- loss: the eval loss the peers logged falls from the first value to the last (`eval_losses`).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[int, int]
"""(stage, round number)."""


@dataclass(frozen=True, slots=True)
class RoundRec:
    """A round as the coordinator stored it (the fields the checks use)."""

    stage: int
    number: int
    phase: str
    opened_at: float
    finished_at: float
    barrier_deadline: float | None
    attempt_deadline: float
    attempt: int
    members: tuple[str, ...]
    commits: dict[str, str]
    committed_hash: str
    diverged: tuple[str, ...]
    last_reason: str

    @property
    def key(self) -> Key:
        return (self.stage, self.number)

    @property
    def finished(self) -> bool:
        return self.phase in ("committed", "aborted")


def _round(d: dict[str, Any]) -> RoundRec:
    return RoundRec(stage=d["stage"], number=d["number"], phase=d["phase"], opened_at=d["opened_at"],
                    finished_at=d["finished_at"], barrier_deadline=d["barrier_deadline"],
                    attempt_deadline=d["attempt_deadline"], attempt=d["attempt"], members=tuple(d["members"]),
                    commits={p: h for p, h in d["commits"]}, committed_hash=d["committed_hash"],
                    diverged=tuple(d["diverged"]), last_reason=(d["reasons"] or [""])[-1])


def read_rounds(db: Path, from_round: int = 0) -> dict[Key, RoundRec] | None:
    """Rounds numbered `from_round` or later in the coordinator's database; None when it cannot be read now."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    try:
        rows = con.execute("SELECT data FROM rounds WHERE number >= ?", (from_round,)).fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    rounds = (_round(json.loads(text)) for (text,) in rows)
    return {r.key: r for r in rounds}


@dataclass
class Ledger:
    """Every committed round seen so far, and every later sighting that contradicts one (a lost round)."""

    seen: dict[Key, str] = field(default_factory=dict)
    """(stage, round) -> committed hash, first seen."""
    source: dict[Key, str] = field(default_factory=dict)
    lost: dict[Key, str] = field(default_factory=dict)
    """(stage, round) -> what contradicted it."""

    def observe(self, rounds: dict[Key, RoundRec], source: str, complete: bool = False) -> None:
        """Record the committed rounds of a read; with `complete` (a read of every round), check every round
        seen before is still there, still committed, with the same hash."""
        for key, r in rounds.items():
            if key in self.seen and (r.phase != "committed" or r.committed_hash != self.seen[key]):
                self._lose(key, f"{source}: {r.phase} {r.committed_hash[:12]}")
            elif r.phase == "committed" and key not in self.seen:
                self.seen[key], self.source[key] = r.committed_hash, source
        if complete:
            for key in self.seen.keys() - rounds.keys():
                self._lose(key, f"{source}: missing")

    def claim(self, key: Key, digest: str, source: str) -> None:
        """A peer says it adopted round `key` with `digest` after the coordinator's OK."""
        if key not in self.seen:
            self.seen[key], self.source[key] = digest, source

    def _lose(self, key: Key, why: str) -> None:
        if key not in self.lost:
            self.lost[key] = f"round {key[1]} (committed {self.seen[key][:12]}, seen by {self.source[key]}) -> {why}"


def overdue(rounds: dict[Key, RoundRec], now: float, grace_s: float) -> dict[Key, str]:
    """Unfinished rounds the coordinator should have moved on by `now` (its deadlines passed `grace_s` ago)."""
    late: dict[Key, str] = {}
    for key, r in rounds.items():
        if r.phase == "running" and now > r.attempt_deadline + grace_s:
            late[key] = f"round {r.number} attempt {r.attempt} running {now - r.attempt_deadline:.1f}s past its deadline"
        elif r.phase == "gathering":
            prev = rounds.get((r.stage, r.number - 1))
            if r.barrier_deadline is not None and now > r.barrier_deadline + grace_s:
                late[key] = f"round {r.number} gathering {now - r.barrier_deadline:.1f}s past its barrier deadline"
            elif r.barrier_deadline is None and prev is not None and prev.finished and \
                    now > prev.finished_at + grace_s:
                late[key] = f"round {r.number} has no barrier deadline {now - prev.finished_at:.1f}s after round " \
                            f"{prev.number} finished"
    return late


def long_rounds(rounds: dict[Key, RoundRec], *, rendezvous_s: float, attempt_s: float, lease_s: float,
                outages: list[tuple[float, float]], stop_at: float, slack_s: float) -> list[str]:
    """Rounds that lived longer than their deadlines allow.

    A round's clock starts when it opened or when the previous round finished, whichever is later (its barrier
    deadline only starts then); it may gather for `rendezvous_s`, then run each of its attempts for `attempt_s`,
    plus, for every coordinator outage it overlapped, the outage and the lease the restarted coordinator renews.
    A round still open when the peers were stopped is judged up to that moment.
    """
    out = []
    for key, r in sorted(rounds.items()):
        prev = rounds.get((r.stage, r.number - 1))
        if prev is not None and not (prev.finished and prev.finished_at < stop_at):
            continue  # waited on a round judged on its own
        start = max(r.opened_at, prev.finished_at if prev is not None else r.opened_at)
        end = min(r.finished_at if r.finished else stop_at, stop_at)
        if end <= start:
            continue
        allowed = rendezvous_s + max(1, r.attempt) * attempt_s + slack_s
        allowed += sum(up - down + lease_s for down, up in outages if down < end and up > start)
        if end - start > allowed:
            out.append(f"round {r.number} ({r.phase}, {r.attempt} attempts) took {end - start:.1f}s, "
                       f"deadlines allow {allowed:.1f}s: {r.last_reason[:200]}")
    return out


def divergences(rounds: dict[Key, RoundRec], reports: dict[str, dict[str, Any]]) -> tuple[int, list[str]]:
    """(members that offered a losing hash or none in committed rounds, violations).

    Violations: a peer whose report says it adopted a round with another hash than the committed one; a member of
    a committed round without the winning hash that offers a losing hash again at its next commit (it should
    have resynced from the donor in between); a member that committed round n-1's winning hash and loses round n
    (it held the run's state, so the majority did not: stale peers outvoted it and the run went back).
    """
    bad: list[str] = []
    for label, rep in reports.items():
        for number, got in (rep.get("per_round") or {}).items():
            r = rounds.get((0, int(number)))
            if r is not None and r.phase == "committed" and got.get("hash") != r.committed_hash:
                bad.append(f"{label} adopted round {number} as {str(got.get('hash'))[:12]}, "
                           f"committed {r.committed_hash[:12]}")
    committed = sorted((r for r in rounds.values() if r.phase == "committed"), key=lambda r: r.key)
    next_commit: dict[str, RoundRec] = {}
    losers = 0
    for r in reversed(committed):  # newest first: next_commit holds each peer's next commit after r
        prev = rounds.get((r.stage, r.number - 1))
        for p in r.members:
            if r.commits.get(p) != r.committed_hash:
                losers += 1
                if p in r.commits and prev is not None and prev.phase == "committed" and \
                        prev.commits.get(p) == prev.committed_hash:
                    winners = sorted(q for q, h in r.commits.items() if h == r.committed_hash)
                    bad.append(f"{p} committed round {prev.number} with its winning hash, yet its hash for round "
                               f"{r.number} lost to {', '.join(winners)}: members that started from the same "
                               f"state and the same mean cannot differ, so the winners did not hold round "
                               f"{prev.number}'s state (or {p} never adopted it)")
                later = next_commit.get(p)
                if later is not None and later.commits[p] != later.committed_hash:
                    bad.append(f"{p} left out of round {r.number} ({'diverged' if p in r.commits else 'no commit'}) "
                               f"offered {later.commits[p][:12]} again in round {later.number} "
                               f"(committed {later.committed_hash[:12]}): never resynced")
        for p in r.commits:
            next_commit[p] = r
    return losers, bad


def final_hashes(survivors: dict[str, str], rounds: dict[Key, RoundRec]) -> list[str]:
    """Violations among the peers stopped at the end: they must hold one hash, the last committed round's."""
    if not survivors:
        return []
    committed = [r for r in rounds.values() if r.phase == "committed"]
    last = max(committed, key=lambda r: r.key).committed_hash if committed else None
    hashes = set(survivors.values())
    if len(hashes) > 1 or (last is not None and hashes != {last}):
        shown = ", ".join(f"{p}={h[:12]}" for p, h in sorted(survivors.items()))
        return [f"survivors end with {len(hashes)} hash(es) ({shown}); last committed {str(last)[:12]}"]
    return []


_EVAL = re.compile(r"^(\S+ \S+) INFO swarm\.train: round (-?\d+) (\w+): eval loss ([0-9.naif]+)")


def eval_losses(log: Path) -> list[tuple[float, int, float]]:
    """(time, round, eval loss) of every eval a `train` peer logged (`swarm --log-level INFO peer`)."""
    out = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            m = _EVAL.match(line)
            if m is None:
                continue
            with contextlib.suppress(ValueError):
                when = time.mktime(time.strptime(m[1].split(",")[0], "%Y-%m-%d %H:%M:%S"))
                out.append((when + int(m[1].split(",")[1]) / 1000, int(m[2]), float(m[4])))
    return out
