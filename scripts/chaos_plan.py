"""The settings and the fault schedule of a chaos run (scripts/chaos.py): the schedule is a function of the seed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from chaos_procs import LabSpec

KINDS = ("peer_kill", "join", "stall", "coordinator_kill")
LAB_KINDS = (*KINDS, "link_cut")
LENGTHS_S = {"peer_kill": (1.0, 8.0), "join": (0.0, 0.0), "stall": (1.0, 6.0), "coordinator_kill": (0.3, 3.0),
             "link_cut": (1.0, 6.0)}
"""Range of each kind's `Fault.length_s`: a killed peer's absence, a stall, an outage, a cut. Stalls and cuts
straddle the 3 s lease: some peers come back before the coordinator drops them, others after."""


@dataclass(kw_only=True, slots=True)
class ChaosConfig:
    """One chaos run's settings (the flags)."""

    duration_s: float
    peers: int
    seed: int
    out: Path
    lab: LabSpec | None = None
    fault_every_s: float = 10.0
    settle_s: float = 15.0
    inner_steps: int = 10
    lease_s: float = 3.0
    rendezvous_timeout_s: float = 10.0
    attempt_timeout_s: float = 20.0
    max_attempts: int = 5
    allreduce_timeout_s: float = 10.0
    stop_timeout_s: float = 20.0
    quiet_timeout_s: float = 40.0
    watchdog_s: float = 0.0

    def __post_init__(self) -> None:
        if self.peers < 2 or self.duration_s <= self.settle_s or self.fault_every_s <= 0:
            raise ValueError("--peers must be >= 2, --duration above --settle-s, --fault-every > 0")


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: when (seconds after the first commit), what, and its seeded draws."""

    at_s: float
    kind: str
    pick: float
    """Which target, as a fraction of the candidates at that moment."""
    length_s: float
    """How long a stall, a cut or a coordinator outage lasts; how long a killed peer stays away."""
    same_id: bool
    """A killed peer's replacement joins under the same id (else a new one)."""


def plan(cfg: ChaosConfig) -> list[Fault]:
    """The run's faults, from the seed alone: kinds drawn as shuffled bags (each kind once per bag, so every kind
    comes about equally often), gaps uniform in [0.5, 1.5] x --fault-every."""
    rng = random.Random(cfg.seed)
    kinds = LAB_KINDS if cfg.lab is not None else KINDS
    faults: list[Fault] = []
    bag: list[str] = []
    t = 3.0
    while True:
        t += rng.uniform(0.5, 1.5) * cfg.fault_every_s
        if t > cfg.duration_s - cfg.settle_s:
            return faults
        if not bag:
            bag = rng.sample(kinds, len(kinds))
        kind = bag.pop()
        low, high = LENGTHS_S[kind]
        faults.append(Fault(round(t, 3), kind, rng.random(), round(rng.uniform(low, high), 3), rng.random() < 0.5))
