"""A pipeline run's settings: the shared training settings plus the pipeline's own (the `[pipeline]` table)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from swarm.pipeline.recovery import RecoveryConfig
from swarm.task.model import SIZES, ModelConfig
from swarm.training import TrainingConfig


@dataclass(kw_only=True, slots=True)
class PipelineConfig(TrainingConfig):
    """A pipeline run's settings (the same on every peer of the run, except the shard and the device).

    `steps` counts each driver's (stage-0 peer's) optimizer steps and `sync_every` is DiLoCo among a
    stage's replicas; `model` gives the width and heads, the depth is stages x blocks_per_stage.
    """

    TABLE: ClassVar[str] = "pipeline"
    stages: int = 3
    """S: pipeline stages (the coordinator must be started with the same --stages)."""
    blocks_per_stage: int = 1
    """Transformer blocks per stage."""
    microbatches: int = 2
    """Microbatches per step; the batch is cut into this many (odd ones run out of order under checkfree+)."""
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    """How a lost stage is rebuilt: checkfree, checkfree+ or random."""
    activations: Literal["none", "int8"] = "none"
    """Activations sent between stages as fp32 or blockwise int8 (gradients always go as fp32)."""
    eval_every: int = 25
    """Driver steps between evals of the held-out loss through the pipeline (0: only at the end)."""
    eval_batches: int = 2
    """Held-out batches per eval (each one crosses every stage)."""
    copy_every: int = 10
    """checkfree+: steps between refreshes of the (de)embedding copies the swap partners keep."""
    call_timeout_s: float = 60.0
    """Cap on one microbatch's trip from a hop to the end of its route and back."""
    stall_timeout_s: float = 180.0
    """A driver stops with an error when a stage has had no live replica this long."""
    idle_timeout_s: float = 180.0
    """A non-driver stops after this long without a microbatch (its drivers are gone for good)."""
    map_every_s: float = 0.5
    """How often the stage map is read from the coordinator."""

    def __post_init__(self) -> None:
        TrainingConfig.__post_init__(self)  # (no zero-argument super() in a slots dataclass)
        if self.model not in SIZES:
            raise ValueError(f"pipeline.model must be one of {', '.join(SIZES)}: a pipeline cuts the built-in model "
                             f"into stages (hf: models train with --task train), got {self.model!r}")
        if self.stages < 1 or self.blocks_per_stage < 1 or self.microbatches < 1:
            raise ValueError("pipeline.stages, pipeline.blocks_per_stage and pipeline.microbatches must be >= 1")
        if self.data.batch_size % self.microbatches:
            raise ValueError(f"the batch size ({self.data.batch_size}) must be a multiple of "
                             f"pipeline.microbatches ({self.microbatches})")
        if self.recovery.method == "checkpoint":
            raise ValueError("recovery 'checkpoint' exists in the simulation (scripts/repro_checkfree.py) only; "
                             "a pipeline run rebuilds lost stages with checkfree, checkfree+ or random")
        self.recovery.check_stages(self.stages)
        if self.activations not in ("none", "int8"):
            raise ValueError(f"pipeline.activations must be 'none' or 'int8', got {self.activations!r}")
        if self.eval_every < 0 or self.eval_batches < 1 or self.copy_every < 1:
            raise ValueError("pipeline.eval_every must be >= 0, pipeline.eval_batches and pipeline.copy_every >= 1")

    def model_config(self) -> ModelConfig:
        """The model's shape: the named size with stages x blocks_per_stage blocks."""
        return replace(SIZES[self.model], n_layers=self.stages * self.blocks_per_stage)


FLAGS = {"recovery.method": "--recovery", "recovery.lr_boost": "--lr-boost"}
"""Field -> the flag name it had before flags were generated (next to `--recovery.method`, ...)."""
FILE_ONLY = frozenset({"eval_batches", "recovery.checkpoint_every", "recovery.checkpoint_scope"})
"""Fields without a flag: eval_batches is also the train task's, with another default (a pipeline eval
crosses every stage); the checkpoint options belong to the simulation's recovery method only."""
