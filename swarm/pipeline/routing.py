"""Where a microbatch goes next: the hops of its route and the replica that serves each.

A route is the list of hops a microbatch makes through the pipeline, each hop a stage and what that
stage computes there: `e` the token embedding, `b` the stage's blocks, `h` the final norm, the head
and the loss. In order (`[(0, "eb"), (1, "b"), ..., (S-1, "bh")]`) a microbatch visits every stage
once; CheckFree+'s out-of-order schedule swaps the first two and the last two block stages on odd
microbatches, so stage 0 embeds, stage 1 runs its blocks, stage 0 runs its blocks, ..., and the last
stage runs the head after stage S-2's blocks.

`Router` picks, among the live replicas of a stage, the one expected to finish a microbatch first:
(microbatches it is already working on for us + 1) × its measured seconds per microbatch (an
exponential moving average of our calls to it; a replica never measured counts as the fastest known,
so every replica gets tried). A replica whose call failed is left out for `cooldown_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm.pipeline.schedule import block_order

Hop = tuple[int, str]
"""(stage, ops): ops a non-empty string of `e` (embed), `b` (blocks), `h` (head and loss) in that order."""
OPS = "ebh"


def route(n_stages: int, microbatch_index: int, out_of_order: bool) -> list[Hop]:
    """The hops of one microbatch.

    Args:
        n_stages: S.
        microbatch_index: the microbatch's index within its step (odd ones swap under `out_of_order`).
        out_of_order: CheckFree+'s schedule.

    Returns:
        Hops with consecutive ones on the same stage merged, e.g. [(0, "eb"), (1, "b"), (2, "bh")].
    """
    hops: list[Hop] = [(0, "e")]
    hops += [(s, "b") for s in block_order(n_stages, microbatch_index, out_of_order)]
    hops.append((n_stages - 1, "h"))
    merged: list[Hop] = []
    for stage, ops in hops:
        if merged and merged[-1][0] == stage:
            merged[-1] = (stage, merged[-1][1] + ops)
        else:
            merged.append((stage, ops))
    return merged


def check_route(hops: object, n_stages: int) -> list[Hop]:
    """Validate a route received from another peer.

    Returns:
        The route as a list of (stage, ops) tuples.

    Raises:
        ValueError: not a non-empty list of [stage, ops] with stages in range and ops in `ebh` order,
            the embedding not first or the head not last.
    """
    if not isinstance(hops, list) or not 1 <= len(hops) <= 2 * n_stages + 2:
        raise ValueError("a route must be a non-empty list of at most 2·S + 2 hops")
    out: list[Hop] = []
    for hop in hops:
        if (not isinstance(hop, (list, tuple)) or len(hop) != 2 or not isinstance(hop[0], int)
                or isinstance(hop[0], bool) or not isinstance(hop[1], str)):
            raise ValueError(f"a hop must be [stage, ops], got {str(hop)[:40]}")
        stage, ops = hop
        if not 0 <= stage < n_stages:
            raise ValueError(f"hop stage {stage} is outside 0..{n_stages - 1}")
        if not ops or "".join(o for o in OPS if o in ops) != ops:
            raise ValueError(f"hop ops must be a non-empty ordered subset of {OPS!r}, got {ops!r}")
        out.append((stage, ops))
    if "e" not in out[0][1] or any("e" in ops for _, ops in out[1:]):
        raise ValueError("the embedding must be the route's first op and appear once")
    if "h" not in out[-1][1] or any("h" in ops for _, ops in out[:-1]):
        raise ValueError("the head must be the route's last op and appear once")
    return out


@dataclass(slots=True)
class _Replica:
    address: str
    seconds: float | None = None
    """Moving average of seconds per call (None: never measured)."""
    in_flight: int = 0
    down_until: float = 0.0


@dataclass(slots=True)
class Router:
    """The live replicas of each stage and how fast each served our calls.

    Args:
        self_id: this peer's id (never routed to over the network).
        cooldown_s: how long a replica whose call failed is left out.
        smoothing: weight of the newest measurement in the moving average.
    """

    self_id: str
    cooldown_s: float = 5.0
    smoothing: float = 0.3
    _stages: dict[int, dict[str, _Replica]] = field(default_factory=dict)

    def update(self, members: Mapping[int, Mapping[str, str]]) -> None:
        """Replace the stage map (stage -> {peer id: data-plane address}); measurements of kept peers stay."""
        fresh: dict[int, dict[str, _Replica]] = {}
        for stage, peers in members.items():
            old = self._stages.get(stage, {})
            fresh[stage] = {}
            for peer, address in peers.items():
                if peer == self.self_id:
                    continue
                replica = old.get(peer)
                if replica is None or replica.address != address:
                    replica = _Replica(address)
                fresh[stage][peer] = replica
        self._stages = fresh

    def replicas(self, stage: int) -> list[str]:
        """Ids of the stage's replicas known now (other than this peer)."""
        return sorted(self._stages.get(stage, {}))

    def address(self, peer: str) -> str | None:
        """The data-plane address of a known peer."""
        for replicas in self._stages.values():
            if peer in replicas:
                return replicas[peer].address
        return None

    def choose(self, stage: int, now: float, exclude: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """The replica of `stage` expected to finish a microbatch first, as (peer id, address).

        Returns:
            None when the stage has no replica that is known, up and not excluded.
        """
        candidates = [(peer, r) for peer, r in self._stages.get(stage, {}).items()
                      if peer not in exclude and r.down_until <= now]
        if not candidates:
            return None
        known = [r.seconds for _, r in candidates if r.seconds is not None]
        optimistic = min(known) if known else 0.0

        def expected(item: tuple[str, _Replica]) -> tuple[float, str]:
            peer, r = item
            per_call = r.seconds if r.seconds is not None else optimistic
            return ((r.in_flight + 1) * per_call, peer)

        peer, replica = min(candidates, key=expected)
        return peer, replica.address

    def started(self, peer: str) -> None:
        """A call to `peer` went out."""
        replica = self._find(peer)
        if replica is not None:
            replica.in_flight += 1

    def finished(self, peer: str, seconds: float | None, now: float) -> None:
        """A call to `peer` ended: took `seconds` (None: it failed, leave the peer out for a while)."""
        replica = self._find(peer)
        if replica is None:
            return
        replica.in_flight = max(0, replica.in_flight - 1)
        if seconds is None:
            replica.down_until = now + self.cooldown_s
        elif replica.seconds is None:
            replica.seconds = seconds
        else:
            replica.seconds += self.smoothing * (seconds - replica.seconds)

    def _find(self, peer: str) -> _Replica | None:
        for replicas in self._stages.values():
            if peer in replicas:
                return replicas[peer]
        return None
