"""Which stage a peer serves and which data shard it trains on: the coordinator's placement views.

Pure functions of the run's state, like the decisions (`decisions.py` asks `thinnest_stage` where a
peer that joins for any stage goes and `shard_for` its data shard; the service answers heartbeats with
`move_to` and `lost_stages`).
"""

from __future__ import annotations

import collections

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.state import RunState


def thinnest_stage(state: RunState, config: CoordinatorConfig) -> int:
    """The stage a peer that asks for any stage should serve.

    A lost stage (it committed rounds, so it held trained weights, and has no live replica now)
    comes first, then the stage with the fewest live members; ties go to the lowest index.
    """
    if config.stages <= 1:
        return 0
    counts = [len(state.stage_ids(s)) for s in range(config.stages)]
    lost = lost_stages(state, config)
    return min(range(config.stages), key=lambda s: (s not in lost, counts[s], s))


def lost_stages(state: RunState, config: CoordinatorConfig) -> list[int]:
    """Stages that trained (committed a round) and have no live replica now: they need recovery."""
    if config.stages <= 1:
        return []
    return [s for s in range(config.stages) if not state.stage_ids(s) and state.last_committed(s) is not None]


def move_to(state: RunState, config: CoordinatorConfig, peer_id: str) -> int | None:
    """The stage `peer_id` should move to now to rebalance the pipeline, or None to stay.

    Only peers that asked for any stage are moved. The thinnest stage (a lost one first, see
    `thinnest_stage`) is filled from the fattest: when the fattest has at least two live members and
    at least two more than the thinnest, its movable member with the greatest id is told to move
    (one at a time per stage: a mover leaves and joins again for any stage, which puts it on the
    thinnest).
    """
    member = state.members.get(peer_id)
    if config.stages <= 1 or member is None or not member.movable:
        return None
    counts = [len(state.stage_ids(s)) for s in range(config.stages)]
    target = thinnest_stage(state, config)
    fattest = max(range(config.stages), key=lambda s: (counts[s], -s))
    if member.stage != fattest or fattest == target or counts[fattest] < 2 or counts[fattest] - counts[target] < 2:
        return None
    movers = [p for p in state.stage_ids(fattest) if state.members[p].movable]
    return target if max(movers) == peer_id else None


def shard_count(config: CoordinatorConfig) -> int:
    """How many shards `--shard auto` cuts the data into."""
    return config.shards or max(1, config.min_peers)


def shard_for(state: RunState, config: CoordinatorConfig, peer_id: str) -> int:
    """The data shard for a peer joining with `--shard auto`: the lowest no other live member holds, else (more
    peers than shards) the one fewest hold."""
    held = collections.Counter(m.shard for m in state.members.values() if m.shard >= 0 and m.peer_id != peer_id)
    count = shard_count(config)
    return min(range(count), key=lambda s: (held[s], s))  # (one pass: a count per shard was O(members × shards))
