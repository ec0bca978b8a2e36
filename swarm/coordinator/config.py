"""Configuration of the coordinator service (the `[coordinator]` TOML table)."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from swarm.allreduce.robust import Rule
from swarm.config import build, check_table

_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NOT_NUMBERS = frozenset({"run_id", "tls_dir", "insecure", "enroll_port", "probe_timeout_s", "relay", "shards",
                          "aggregate", "norm_bound", "quorum_grace"})


@dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    """How the coordinator serves one run."""

    run_id: str = "default"
    """Name of the run this coordinator serves; peers must send the same."""
    lease_s: float = 10.0
    """A peer that sends no heartbeat for this long is dropped from the run."""
    heartbeat_interval_s: float = 0.0
    """How often peers are told to heartbeat; at most lease_s / 2 (0: lease_s / 4). In a large run both grow with
    its size (heartbeats_per_s)."""
    heartbeats_per_s: float = 500.0
    """Heartbeats a second the coordinator aims to receive at most: once live members outnumber heartbeats_per_s *
    heartbeat_interval_s, every member is told (in its Join and Heartbeat replies) to heartbeat every members /
    heartbeats_per_s seconds, and leases grow in the same proportion, so heartbeats cost the coordinator the same
    at 10,000 peers as at 1,000 (a silent peer is then dropped later; a peer that dies in a round is reported by
    its partners at once)."""
    rendezvous_timeout_s: float = 30.0
    """A round's barrier closes this long after it opened even if live members are missing."""
    attempt_timeout_s: float = 120.0
    """An attempt must commit within this long, plus the time the largest payload its members declared needs at
    10 Mbit/s, twice over (`rounds.attempt_time_s`); then the round ends with whoever committed."""
    max_payload_bytes: int = 1 << 40
    """The largest all-reduce payload a member may declare (1 TiB): bounds how far a declaration stretches an
    attempt's deadline."""
    min_peers: int = 1
    """A round does not start with fewer arrived peers than this."""
    quorum: float = 1.0
    """The straggler policy: a round starts once this fraction of the stage's live members has arrived (and its
    previous round finished), or at its barrier deadline (rendezvous_timeout_s), whichever is first; 1: wait for
    every live member. Who arrives after the start keeps its update for its next round (docs/decisions.md)."""
    quorum_grace: float = 0.25
    """With quorum below 1: once the quorum arrived, the round waits this fraction of the time the quorum took
    (from when its barrier clock started) for the others, so peers of one speed that arrive a moment apart are
    not left out; 0: start at once."""
    shards: int = 0
    """Data shards handed to peers started with `--shard auto` (each the lowest one no live member holds, so peers
    do not train on the same data; past that the one fewest hold); 0: min_peers."""
    max_attempts: int = 5
    """A round whose attempts keep failing is aborted after this many."""
    report_window_s: float = 1.0
    """Failure reports of one attempt are collected this long (or until every member spoke), then
    the most-accused member is excluded, so a stalled peer blaming others cannot exclude them."""
    max_wait_s: float = 20.0
    """Longest a Rendezvous or CommitRound call is held before answering WAITING."""
    max_message_bytes: int = 1 << 20
    """Largest request accepted; larger ones get RESOURCE_EXHAUSTED."""
    probe_timeout_s: float = 2.0
    """On Join, the coordinator tries to connect to the peer's data-plane address for this long: a peer it cannot
    reach (behind NAT) is marked unreachable and dials the others instead (0: do not probe, all reachable)."""
    relay: str = ""
    """HOST:PORT of a `swarm relay` that peers nobody can dial use to reach each other; unset: they meet through
    the first member of the round others can dial."""
    rpc_rate_per_s: float = 50.0
    """Requests one peer (or, for requests naming no peer, one address) may make per second, sustained;
    past its budget a request gets RESOURCE_EXHAUSTED ("rate limit ...") and changes nothing. An honest
    peer makes about one a second."""
    rpc_burst: float = 200.0
    """Requests one peer may make at once after being quiet (the bucket's size)."""
    tick_interval_s: float = 0.05
    """How often deadlines and leases are checked."""
    flush_interval_s: float = 1.0
    """How often heartbeat progress is written to the database (leases restart with grace)."""
    stages: int = 1
    """Pipeline stages of the run. Above 1, peers serve stages 0 .. stages-1 and a peer that asks
    for any stage gets the thinnest one (a stage that lost every replica first); at 1, stage
    numbers are free-form groups and a peer asking for any stage gets stage 0."""
    tls_dir: str | None = None
    """Folder with the run's ca.crt and the coordinator's coordinator.crt/.key (`swarm keys issue
    coordinator`): serve over mutual TLS, admit only peers with a certificate of this run's CA, and let each
    act only as the peer its certificate names. Unset: plaintext, allowed on a loopback address only."""
    insecure: bool = False
    """Serve plaintext on a non-loopback address anyway: anyone who reaches the port can join, leave or
    commit as any peer. For a trusted private network only."""
    enroll_port: int | None = None
    """Also serve join-token enrollment on this port (0: a free one), with server-only TLS: a peer started
    with `--token` sends a certificate request there and gets its certificate. Needs tls_dir to hold the run
    CA's ca.key (docs/security.md, "Join tokens"); by convention the coordinator's port + 1. Unset: off."""

    aggregate: str = "mean"
    """How rounds average contributions (told to every member in each attempt): mean, clipped-mean (each
    scaled down to the round's median norm) or trimmed-mean[:B] (per coordinate, the B largest and smallest
    values dropped; default B 1). See docs/security.md, "Poisoned updates"."""
    norm_bound: float = 0.0
    """Refuse a contribution whose declared norm exceeds this times the round's median norm (its sender is
    named in the round's reasons and resyncs), and name a member whose update points against the round's mean
    (from the directions members report with their commits); 0: off. A peer refused in quarantine_after of the
    last quarantine_rounds rounds is left out of every round until its refusals age out of that window."""
    quarantine_after: int = 3
    """With norm_bound: refusals (within quarantine_rounds) that quarantine a peer."""
    quarantine_rounds: int = 10
    """With norm_bound: the window of a stage's latest rounds whose refusals count towards a quarantine."""

    def __post_init__(self) -> None:
        try:
            self.aggregate = str(Rule.parse(self.aggregate))
        except ValueError as e:
            raise ValueError(f"coordinator.{e}") from None
        if not (isinstance(self.norm_bound, int | float) and math.isfinite(self.norm_bound)
                and (self.norm_bound == 0 or self.norm_bound > 1)):
            raise ValueError(f"coordinator.norm_bound must be 0 (off) or a factor above 1, got {self.norm_bound!r}")
        if self.quarantine_after > self.quarantine_rounds:
            raise ValueError("coordinator.quarantine_after must be at most coordinator.quarantine_rounds")
        if not (isinstance(self.quorum, int | float) and 0 < self.quorum <= 1):
            raise ValueError(f"coordinator.quorum must be a fraction in (0, 1], got {self.quorum!r}")
        if not (isinstance(self.quorum_grace, int | float) and 0 <= self.quorum_grace <= 10):
            raise ValueError(f"coordinator.quorum_grace must be 0..10, got {self.quorum_grace!r}")
        if self.heartbeat_interval_s == 0:
            self.heartbeat_interval_s = self.lease_s / 4
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} must match [A-Za-z0-9._-]{{1,64}}; set coordinator.run_id")
        if self.tls_dir == "":
            raise ValueError("coordinator.tls_dir must name a folder (--tls-dir DIR)")
        if self.tls_dir is not None and self.insecure:
            raise ValueError("coordinator.tls_dir and coordinator.insecure are both set: give --tls-dir DIR or "
                             "--insecure, not both")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 0:
            raise ValueError(f"coordinator.shards must be a whole number >= 0 (0: min_peers), got {self.shards!r}")
        if self.enroll_port is not None:
            if self.tls_dir is None:
                raise ValueError("coordinator.enroll_port needs coordinator.tls_dir (--tls-dir DIR holding ca.key): "
                                 "join tokens issue certificates of the run's CA")
            if isinstance(self.enroll_port, bool) or not isinstance(self.enroll_port, int) \
                    or not 0 <= self.enroll_port <= 65535:
                raise ValueError(f"coordinator.enroll_port must be a port, 0-65535, got {self.enroll_port!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_NUMBERS:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"coordinator.{f.name} must be a positive number, got {value!r}")
        if self.heartbeat_interval_s * 2 > self.lease_s:
            raise ValueError(
                f"coordinator.heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"coordinator.lease_s ({self.lease_s}) or one late heartbeat drops a healthy peer"
            )
        if not (isinstance(self.probe_timeout_s, int | float) and 0 <= self.probe_timeout_s <= 60):
            raise ValueError(f"coordinator.probe_timeout_s must be 0..60 seconds, got {self.probe_timeout_s!r}")
        host, _, port = self.relay.rpartition(":")
        if self.relay and not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"coordinator.relay must be HOST:PORT, got {self.relay!r}")
        if self.rpc_burst < 1:
            raise ValueError(f"coordinator.rpc_burst must be at least 1, got {self.rpc_burst!r}")
        if self.max_message_bytes < 4096:
            raise ValueError("coordinator.max_message_bytes must be at least 4096")

    def pace(self, members: int) -> tuple[float, float]:
        """(heartbeat interval, lease) in seconds for a run of `members` live members: the configured ones, both
        stretched by members / (heartbeats_per_s * heartbeat_interval_s) once that exceeds 1."""
        stretch = max(1.0, members / (self.heartbeats_per_s * self.heartbeat_interval_s))
        return self.heartbeat_interval_s * stretch, self.lease_s * stretch

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> CoordinatorConfig:
        """Read the `[coordinator]` table of a run file (a top-level `run_id` too); keyword overrides that
        are not None win (CLI flags).

        Raises:
            ValueError: unknown keys or bad values, naming the file and the key.
            FileNotFoundError: the file does not exist.
        """
        with open(path, "rb") as f:
            data = tomllib.load(f)
        table = dict(data.get("coordinator", {}))
        if "run_id" in data and "run_id" not in table:
            table["run_id"] = data["run_id"]
        try:
            values = check_table(cls, table, where="coordinator")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return build(cls, values, {k: v for k, v in overrides.items() if v is not None})
