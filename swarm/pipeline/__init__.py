"""Pipeline stages and the recovery of lost stages (CheckFree, CheckFree+, checkpoint, random).

`stages` cuts the built-in model into stages of identical blocks, `schedule` is CheckFree+'s
out-of-order microbatch schedule, `recovery` decides a lost stage's new weights. Stage runners and
the coordinator's stage map build on these; nothing here touches the network.
"""

from swarm.pipeline.recovery import (
    METHODS,
    Recovery,
    RecoveryConfig,
    SnapshotStore,
    StageSnapshot,
    checkfree_weights,
    rebuild_order,
    recover,
)
from swarm.pipeline.schedule import block_order, swap_partner
from swarm.pipeline.stages import StageLayout, pipeline_forward, split_stages, stage_forward, stage_state

__all__ = [
    "METHODS",
    "Recovery",
    "RecoveryConfig",
    "SnapshotStore",
    "StageLayout",
    "StageSnapshot",
    "block_order",
    "checkfree_weights",
    "pipeline_forward",
    "rebuild_order",
    "recover",
    "split_stages",
    "stage_forward",
    "stage_state",
    "swap_partner",
]
