"""The fault-injection seam of the data plane.

Production code calls `FaultInjector.hit(point, ...)` at named points; with no
rules (the default) that is a dictionary lookup. Tests and the chaos script
pass rules that drop, delay or corrupt a frame, close the connection, or kill
the whole process (SIGKILL, no cleanup) at that point. Named points:

    send.contrib  send.result   before a frame of that kind is sent
    recv.contrib  recv.result   after a frame header of that kind was read
    reduce.done                 after this peer reduced its part, before sending it
    gather.start                before this peer sends its reduced part to anyone
                                (gathered payloads, which send nothing after the reduce:
                                both points come once this peer reduced everything)
"""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["drop", "delay", "corrupt", "close", "exit"]
POINTS: frozenset[str] = frozenset(
    {"send.contrib", "send.result", "recv.contrib", "recv.result", "reduce.done", "gather.start"}
)


@dataclass(kw_only=True, slots=True)
class FaultRule:
    """Act at `point` when the filters match, after `after` matches, `times` times (0: always)."""

    point: str
    action: Action
    round: int | None = None
    attempt: int | None = None
    peer: str | None = None
    """The remote peer of the frame (receiver for send.*, sender for recv.*)."""
    after: int = 0
    times: int = 1
    delay_s: float = 0.0
    probability: float = 1.0
    _seen: int = field(default=0, repr=False)
    _fired: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"fault point {self.point!r} is not one of {sorted(POINTS)}")
        if self.action not in ("drop", "delay", "corrupt", "close", "exit"):
            raise ValueError(f"fault action {self.action!r} must be drop, delay, corrupt, close or exit")


class FaultInjector:
    """Decides, at each named point, whether a fault fires."""

    def __init__(self, rules: list[FaultRule] | None = None, seed: int = 0) -> None:
        self._by_point: dict[str, list[FaultRule]] = {}
        for rule in rules or []:
            self._by_point.setdefault(rule.point, []).append(rule)
        self._rng = random.Random(seed)

    @classmethod
    def from_json(cls, text: str) -> FaultInjector:
        """Rules as a JSON list of objects with FaultRule's fields (the SWARM_FAULTS format).

        Raises:
            ValueError: malformed JSON or an unknown point, action or field.
        """
        try:
            items = json.loads(text) if text.strip() else []
            return cls([FaultRule(**item) for item in items])
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"bad fault rules {text!r}: {e}") from None

    def __bool__(self) -> bool:
        return bool(self._by_point)

    def hit(self, point: str, *, round: int, attempt: int, peer: str = "") -> FaultRule | None:
        """The rule firing at this point now, if any; `exit` rules kill the process here."""
        for rule in self._by_point.get(point, ()):
            if (rule.round is not None and rule.round != round) or (
                rule.attempt is not None and rule.attempt != attempt) or (
                rule.peer is not None and rule.peer != peer):
                continue
            rule._seen += 1
            if rule._seen <= rule.after or (rule.times and rule._fired >= rule.times):
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule._fired += 1
            if rule.action == "exit":
                os.kill(os.getpid(), signal.SIGKILL)
            return rule
        return None


NO_FAULTS = FaultInjector()
