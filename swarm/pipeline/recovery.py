"""Rebuilding a lost pipeline stage: CheckFree, CheckFree+ and the two baselines.

Everything here is a pure function of the data handed in (the surviving stages' weights, their last
gradient norms, stored snapshots): it decides what the lost stage's weights become and what happens
to its optimizer and learning rate, and says why. Who fetches the weights over the network, and in
which order several lost stages are rebuilt, is the caller's business.

Methods (`RecoveryConfig.method`):

- `checkfree`: a lost middle stage i becomes W_i = (a·W_{i+1} + b·W_{i-1}) / (a + b), a and b the
  last gradient norms of stages i+1 and i-1, measured before clipping (after clipping every norm is
  the clip value and the weights collapse to a plain average). Plain CheckFree cannot rebuild an end
  stage (it has one block neighbour and owns the embedding or the head); like the authors' no-swap
  script it falls back to that stage's last periodic checkpoint (weights only).
- `checkfree+`: the same for middle stages; the first and last block stage are rebuilt as a copy of
  their swap partner (stage 1, stage S-2; the out-of-order schedule trains the partners to stand in
  for each other), and their embedding / final norm and head come from the copy the partner keeps.
- `checkpoint`: every stage saves weights and optimizer state every `checkpoint_every` steps; a lost
  stage is restored from its last save. With `checkpoint_scope = "pipeline"` (the paper's baseline)
  every stage returns to that step, so the steps since are lost and redone; with "stage" only the
  lost stage goes back.
- `random`: fresh initial weights.

Every method but `checkpoint` starts the rebuilt stage with a fresh optimizer state and sets its
learning-rate multiplier to `lr_boost` (1.1 in the paper; set, not compounded over repeated losses).

Where the paper's text and the authors' code differ we follow DESIGN.md: the code computes the norms
after `clip_grad_norm_(max_norm=1)` and adds 1e-4 to each; we use the pre-clipping norms as written,
and fall back to a plain average only when both norms are 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from swarm.pipeline.schedule import swap_partner
from swarm.pipeline.stages import StageLayout, clone_state, stage_state, state_nbytes
from swarm.task.model import ModelConfig, build_model

Method = Literal["checkfree", "checkfree+", "checkpoint", "random"]
METHODS: tuple[Method, ...] = get_args(Method)
"""Every recovery method, in the order reports list them."""

CheckpointScope = Literal["pipeline", "stage"]
RecoveryKind = Literal["average", "copy", "checkpoint", "fresh"]

_BLOCK_PREFIX = "blocks."


@dataclass(kw_only=True, slots=True)
class RecoveryConfig:
    """How a run rebuilds a lost stage (the `[recovery]` TOML table)."""

    method: Method = "checkfree"
    """checkfree (from the neighbours' weights), checkfree+ (end stages also from their swap partner; trains
    out of order), checkpoint (from snapshots; the simulation only) or random (fresh weights)."""
    lr_boost: float = 1.1
    """Learning-rate multiplier a rebuilt stage trains with from then on (not for checkpoint restores)."""
    checkpoint_every: int = 100
    """Steps between periodic snapshots: of every stage (checkpoint), of the two end stages (checkfree)."""
    checkpoint_scope: CheckpointScope = "pipeline"
    """checkpoint: on a loss every stage returns to the last snapshot ("pipeline") or only the lost one ("stage")."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"recovery.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (math.isfinite(self.lr_boost) and self.lr_boost > 0):
            raise ValueError(f"recovery.lr_boost must be a positive number, got {self.lr_boost}")
        if self.checkpoint_every < 1:
            raise ValueError(f"recovery.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.checkpoint_scope not in get_args(CheckpointScope):
            raise ValueError(f"recovery.checkpoint_scope must be 'pipeline' or 'stage', got {self.checkpoint_scope!r}")

    @property
    def out_of_order(self) -> bool:
        """Training must use the swapped schedule on odd microbatches (checkfree+)."""
        return self.method == "checkfree+"

    def check_stages(self, n_stages: int) -> None:
        """Refuse a stage count the method cannot work with.

        Raises:
            ValueError: checkfree+ with 3 stages (its swap schedule is undefined there).
        """
        if self.out_of_order and n_stages == 3:
            raise ValueError("recovery.method = 'checkfree+' needs 1, 2 or at least 4 stages, got 3")

    def checkpointed_stages(self, n_stages: int) -> tuple[int, ...]:
        """Stages that must save a snapshot every `checkpoint_every` steps.

        Returns:
            All stages (checkpoint), the end stages (checkfree's fallback), or none.
        """
        if self.method == "checkpoint":
            return tuple(range(n_stages))
        if self.method == "checkfree":
            return tuple(sorted({0, n_stages - 1}))
        return ()

    def checkpoints_optimizer(self) -> bool:
        """Snapshots include the optimizer state (only checkpoint restores it)."""
        return self.method == "checkpoint"

    def extras_copies(self, n_stages: int) -> dict[int, int]:
        """checkfree+: end stage -> the stage that keeps a copy of its embedding / final norm and head.

        Returns:
            {0: 1, S-1: S-2} (for S = 2: {0: 1, 1: 0}); empty for other methods or S = 1.
        """
        if not self.out_of_order or n_stages < 2:
            return {}
        self.check_stages(n_stages)
        holders: dict[int, int] = {}
        for stage in (0, n_stages - 1):
            partner = swap_partner(stage, n_stages)
            assert partner is not None  # end stages of >= 2 block stages always have one
            holders[stage] = partner
        return holders


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """One stored copy of a stage: its weights and, for checkpoints, its optimizer state."""

    step: int
    """Training step the snapshot was taken after."""
    weights: dict[str, torch.Tensor]
    """Stage-relative name -> tensor (owned by the snapshot)."""
    optimizer_state: dict[str, Any] | None = None
    """The stage optimizer's state_dict(), or None when not kept."""

    @property
    def nbytes(self) -> int:
        """Bytes of weights plus optimizer tensors: what a restore downloads."""
        return state_nbytes(self.weights) + _optimizer_nbytes(self.optimizer_state)


@dataclass(slots=True)
class SnapshotStore:
    """The latest snapshot of each stage (periodic checkpoints, or the extras copies checkfree+ keeps)."""

    _latest: dict[int, StageSnapshot] = field(default_factory=dict)

    def save(
        self,
        stage: int,
        step: int,
        weights: Mapping[str, torch.Tensor],
        optimizer_state: dict[str, Any] | None = None,
    ) -> StageSnapshot:
        """Store deep copies, replacing the stage's previous snapshot.

        Args:
            stage: whose snapshot.
            step: the step it was taken after.
            weights: the stage's weights (copied; later changes to them do not reach the snapshot).
            optimizer_state: the optimizer's state_dict() (deep-copied), or None.

        Returns:
            The stored snapshot.
        """
        snapshot = StageSnapshot(
            step=step,
            weights=clone_state(dict(weights)),
            optimizer_state=copy.deepcopy(optimizer_state) if optimizer_state is not None else None,
        )
        self._latest[stage] = snapshot
        return snapshot

    def latest(self, stage: int) -> StageSnapshot | None:
        """The stage's last snapshot, or None if it never saved one."""
        return self._latest.get(stage)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What to do about one lost stage."""

    stage: int
    """The stage rebuilt."""
    kind: RecoveryKind
    """average (CheckFree's formula), copy (a neighbour's blocks), checkpoint (a snapshot), fresh (new init)."""
    weights: dict[str, torch.Tensor]
    """The stage's new weights, blocks and extras, stage-relative names (new memory)."""
    optimizer_state: dict[str, Any] | None
    """Load this into the stage's optimizer; None: start it from a fresh state."""
    lr_scale: float
    """The stage's learning-rate multiplier from now on (1.0 = the run's schedule)."""
    rollback_step: int | None
    """checkpoint with pipeline scope: every stage returns to this step (the steps since are redone)."""
    transfer_bytes: int
    """Bytes the replacement downloads to rebuild the stage (neighbours' weights, a snapshot)."""
    reason: str
    """One line for logs and reports."""


def checkfree_weights(
    prev: Mapping[str, torch.Tensor],
    next: Mapping[str, torch.Tensor],  # the paper's name for stage i+1 (shadows the builtin here only)
    grad_norm_prev: float,
    grad_norm_next: float,
) -> dict[str, torch.Tensor]:
    """CheckFree's rebuild of stage i from stages i-1 (`prev`) and i+1 (`next`).

    W_i = (a·W_{i+1} + b·W_{i-1}) / (a + b) with a = `grad_norm_next`, b = `grad_norm_prev`: each
    neighbour weighted by its own last (pre-clipping) gradient norm. Both norms 0 gives the plain
    average. Computed in float32 at least, returned in the inputs' dtype.

    Args:
        prev: block weights of stage i-1, stage-relative names.
        next: block weights of stage i+1, the same names and shapes.
        grad_norm_prev: b, the last gradient norm of stage i-1 (>= 0).
        grad_norm_next: a, the last gradient norm of stage i+1 (>= 0).

    Returns:
        name -> new tensor.

    Raises:
        ValueError: the key sets or shapes differ, or a norm is negative or not finite.
    """
    for what, norm in (("grad_norm_prev", grad_norm_prev), ("grad_norm_next", grad_norm_next)):
        if not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"{what} must be a finite number >= 0, got {norm}")
    if prev.keys() != next.keys():
        raise ValueError(
            f"neighbour weights have different keys: {sorted(prev.keys() ^ next.keys())[:4]}; pass the blocks of both"
        )
    a, b = float(grad_norm_next), float(grad_norm_prev)
    if a + b == 0.0:
        a = b = 1.0  # no information either way: the plain average
    out: dict[str, torch.Tensor] = {}
    for name, w_prev in prev.items():
        w_next = next[name]
        if w_prev.shape != w_next.shape:
            raise ValueError(f"{name}: shapes {tuple(w_prev.shape)} and {tuple(w_next.shape)} differ")
        dtype = torch.promote_types(w_next.dtype, torch.float32)
        mixed = (a * w_next.to(dtype) + b * w_prev.to(dtype)) / (a + b)
        out[name] = mixed.to(w_next.dtype)
    return out


def fresh_stage_weights(config: ModelConfig, layout: StageLayout, stage: int, seed: int) -> dict[str, torch.Tensor]:
    """Newly initialised weights for one stage (the `random` method), drawn as `build_model` draws them.

    Builds a whole model on the CPU and keeps one stage: simple and exactly the model's own
    initialisation, at the cost of initialising the other stages too.

    Args:
        config: the model's shape.
        layout: how it is cut.
        stage: which stage.
        seed: initialisation seed (use a new one per loss, or the stage comes back as it started).

    Returns:
        Stage-relative name -> tensor, blocks and extras.
    """
    model = build_model(config, seed)
    return clone_state(stage_state(model, layout, stage))


def recover(
    config: RecoveryConfig,
    stage: int,
    layout: StageLayout,
    *,
    survivors: Mapping[int, Mapping[str, torch.Tensor]],
    grad_norms: Sequence[float],
    checkpoint: StageSnapshot | None = None,
    extras_copy: Mapping[str, torch.Tensor] | None = None,
    fresh: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> Recovery:
    """Decide the new weights, optimizer state and learning rate of lost stage `stage`.

    Args:
        config: the method and its settings.
        stage: the lost stage.
        layout: how the model is cut.
        survivors: stage -> current weights of stages that are available (at least their blocks);
            checkfree reads the two neighbours, checkfree+ the swap partner of an end stage. A stage
            lost at the same time must be left out, or put in once rebuilt (see `rebuild_order`).
        grad_norms: last pre-clipping gradient norm of every stage's blocks, indexed by stage.
        checkpoint: the lost stage's last snapshot (checkpoint; checkfree's end-stage fallback).
        extras_copy: checkfree+, end stage: the copy of its embedding / final norm and head kept by
            its partner; None when that copy was lost (then `fresh` supplies new extras).
        fresh: makes newly initialised weights for the stage: the random method, and the last resort
            when nothing else is available (no neighbour survived, no snapshot exists).

    Returns:
        The decision, with new tensors (nothing in the inputs is aliased or changed).

    Raises:
        ValueError: what the method needs is missing (snapshot for checkpoint, `fresh` for random or
            as the last resort, the extras copy or `fresh` for a checkfree+ end stage), or the stage is
            out of range.
    """
    n = layout.n_stages
    layout.blocks(stage)  # range check
    config.check_stages(n)
    boost = config.lr_boost

    if config.method == "checkpoint":
        if checkpoint is None:
            raise ValueError(f"stage {stage} has no checkpoint to restore; save one at step 0 before training")
        weights = clone_state(checkpoint.weights)
        pipeline = config.checkpoint_scope == "pipeline"
        return Recovery(
            stage=stage,
            kind="checkpoint",
            weights=weights,
            optimizer_state=copy.deepcopy(checkpoint.optimizer_state),
            lr_scale=1.0,
            rollback_step=checkpoint.step if pipeline else None,
            transfer_bytes=checkpoint.nbytes,
            reason=(
                f"stage {stage} restored from its checkpoint of step {checkpoint.step}"
                + ("; every stage returns to that step" if pipeline else "; the other stages keep their progress")
            ),
        )

    if config.method == "random":
        return _fresh(stage, fresh, boost, "random re-initialisation")

    is_end = layout.is_first(stage) or layout.is_last(stage)
    if not is_end:
        return _average_middle(stage, survivors, grad_norms, fresh, boost)
    if config.method == "checkfree+" and n >= 2:
        return _copy_partner(stage, layout, survivors, extras_copy, fresh, boost)
    # Plain CheckFree has no rule for an end stage (one block neighbour, and the embedding or head is
    # nowhere else): the authors fall back to a periodic snapshot of it.
    if checkpoint is not None:
        return Recovery(
            stage=stage,
            kind="checkpoint",
            weights=clone_state(checkpoint.weights),
            optimizer_state=None,
            lr_scale=boost,
            rollback_step=None,
            transfer_bytes=state_nbytes(checkpoint.weights),
            reason=f"end stage {stage} restored from its snapshot of step {checkpoint.step} (plain CheckFree's fallback)",
        )
    return _fresh(stage, fresh, boost, f"end stage {stage} has no snapshot")


def rebuild_order(lost: Sequence[int], n_stages: int) -> list[int]:
    """The order in which to rebuild stages lost at the same moment.

    Middle stages first (they need only their neighbours), then the end stages (whose checkfree+
    source, the swap partner, may be a middle stage rebuilt just before). Put a stage into
    `recover`'s survivors once it is rebuilt from neighbours or a snapshot, never one that was
    re-initialised: CheckFree weighs neighbours by gradient norm, and a fresh stage's is large.

    Args:
        lost: stages lost together, any order, no duplicates.
        n_stages: S.

    Returns:
        The same stages, middle ones ascending, then 0 and S-1.

    Raises:
        ValueError: a stage is out of range or listed twice.
    """
    if len(set(lost)) != len(lost) or not all(0 <= s < n_stages for s in lost):
        raise ValueError(f"lost stages must be distinct and in [0, {n_stages}), got {list(lost)}")
    ends = {0, n_stages - 1}
    return sorted(s for s in lost if s not in ends) + sorted(s for s in lost if s in ends)


def _blocks(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in weights.items() if name.startswith(_BLOCK_PREFIX)}


def _average_middle(
    stage: int,
    survivors: Mapping[int, Mapping[str, torch.Tensor]],
    grad_norms: Sequence[float],
    fresh: Callable[[], dict[str, torch.Tensor]] | None,
    boost: float,
) -> Recovery:
    before, after = stage - 1, stage + 1
    have = [s for s in (before, after) if s in survivors]
    if len(have) == 2:
        prev, nxt = _blocks(survivors[before]), _blocks(survivors[after])
        a, b = float(grad_norms[after]), float(grad_norms[before])
        return Recovery(
            stage=stage,
            kind="average",
            weights=checkfree_weights(prev, nxt, b, a),
            optimizer_state=None,
            lr_scale=boost,
            rollback_step=None,
            transfer_bytes=state_nbytes(prev) + state_nbytes(nxt),
            reason=f"stage {stage} = ({a:.4g}·W{after} + {b:.4g}·W{before}) / {a + b:.4g} (last grad norms)",
        )
    if len(have) == 1:
        (source,) = have
        blocks = clone_state(_blocks(survivors[source]))
        return Recovery(
            stage=stage,
            kind="copy",
            weights=blocks,
            optimizer_state=None,
            lr_scale=boost,
            rollback_step=None,
            transfer_bytes=state_nbytes(blocks),
            reason=f"stage {stage} copied from stage {source}: its other neighbour is lost too",
        )
    return _fresh(stage, fresh, boost, f"both neighbours of stage {stage} are lost")


def _copy_partner(
    stage: int,
    layout: StageLayout,
    survivors: Mapping[int, Mapping[str, torch.Tensor]],
    extras_copy: Mapping[str, torch.Tensor] | None,
    fresh: Callable[[], dict[str, torch.Tensor]] | None,
    boost: float,
) -> Recovery:
    partner = swap_partner(stage, layout.n_stages)
    if partner is None or partner not in survivors:
        return _fresh(stage, fresh, boost, f"end stage {stage}'s swap partner is lost too")
    blocks = clone_state(_blocks(survivors[partner]))
    if extras_copy is not None:
        extras, fetched, whence = clone_state(dict(extras_copy)), True, "extras from the copy it keeps"
    elif fresh is not None:
        # The copy lived on the partner; lost with it (the partner was rebuilt from elsewhere).
        extras = {k: v for k, v in fresh().items() if not k.startswith(_BLOCK_PREFIX)}
        fetched, whence = False, "extras re-initialised (their copy was lost with the partner)"
    else:
        raise ValueError(
            f"checkfree+ needs the copy of stage {stage}'s {', '.join(layout.extras(stage))} that stage {partner} "
            "keeps; pass it as extras_copy (or pass `fresh` if that copy was lost too)"
        )
    return Recovery(
        stage=stage,
        kind="copy",
        weights={**blocks, **extras},
        optimizer_state=None,
        lr_scale=boost,
        rollback_step=None,
        transfer_bytes=state_nbytes(blocks) + (state_nbytes(extras) if fetched else 0),
        reason=f"end stage {stage} copied from its swap partner {partner}, {whence}",
    )


def _fresh(stage: int, fresh: Callable[[], dict[str, torch.Tensor]] | None, boost: float, why: str) -> Recovery:
    if fresh is None:
        raise ValueError(f"{why}: stage {stage} can only be re-initialised, and no `fresh` weights maker was given")
    return Recovery(
        stage=stage,
        kind="fresh",
        weights=fresh(),
        optimizer_state=None,
        lr_scale=boost,
        rollback_step=None,
        transfer_bytes=0,
        reason=f"stage {stage} re-initialised ({why})",
    )


def _optimizer_nbytes(state: dict[str, Any] | None) -> int:
    if not state:
        return 0
    tensors = [v for per_param in state.get("state", {}).values() for v in per_param.values() if torch.is_tensor(v)]
    return state_nbytes(tensors)
