"""The settings every DiLoCo training of the built-in model shares: `swarm peer`'s train task, the pipeline.

`TrainingConfig` holds the fields both trainings read (model, seed, the inner optimizer and its
schedule, DiLoCo's sync, the codec, the data and its shard, the device), once, with one default each.
The train task's `TrainConfig` (swarm.peers.train) and the pipeline's `PipelineConfig`
(swarm.pipeline.config) extend it with their own fields, so a file, a flag or a keyword means the
same thing in both. `FLAGS` keeps the flag names these options had before flags were generated from
the fields (`--inner-steps`, `--data`, `--codec`, ...): scripts, the README and `swarm local` use them;
`FILE_ONLY` are the fields that get no flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from swarm.compression import CodecConfig
from swarm.diloco import OuterConfig
from swarm.task import SIZES, DataConfig
from swarm.task.hf import is_hf


def _recipe(kwargs: dict[str, Any]) -> OuterConfig:
    """Where a partly given outer optimizer starts: the recipe of the codec (`OuterConfig.recipe`)."""
    return OuterConfig.recipe(kwargs.get("codec", CodecConfig()).name)


@dataclass(kw_only=True, slots=True)
class TrainingConfig:
    """What every peer of a run trains with (the same on all of them, except the shard and the device)."""

    TABLE: ClassVar[str] = "training"
    """The TOML table of the config and the prefix of the options its errors name."""

    model: str = "tiny"
    """Model: tiny, small or 124m (the built-in byte-level model, `swarm.task.SIZES`), or hf:PATH_OR_NAME (a Hugging
    Face causal LM from a local folder or the local hub cache, its tokenizer for --data; train task only); a
    pipeline has stages x blocks_per_stage blocks of the built-in model."""
    seed: int = 0
    """Initial weights' seed; every peer of a run must use the same one."""
    steps: int = 200
    """Global inner steps of the run (train: rounds x sync_every; pipeline: each driver's optimizer steps)."""
    sync_every: int = 20
    """H: inner steps between DiLoCo syncs (pipeline: among a stage's replicas)."""
    lr: float = 3e-3
    """Peak inner AdamW learning rate."""
    warmup_steps: int = 20
    """Linear warmup of the inner lr, then cosine decay to 10 % at `steps`."""
    weight_decay: float = 0.1
    """Inner AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off); a pipeline stage clips its own and reports the norm before."""
    outer: OuterConfig | None = field(default=None, metadata={"base": _recipe})
    """The outer optimizer; unset, the codec's recipe (`OuterConfig.recipe`), whose options those given replace."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """What pseudo-gradients are sent as."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and batches (a pipeline's drivers read them)."""
    shard_index: int = 0
    """Which shard of the train set this peer trains on."""
    shard_count: int = 1
    """How many shards the train set is cut into (usually the number of peers, or of drivers)."""
    device: str = "cpu"
    """Where this peer computes: cpu, cuda, cuda:1, mps."""
    outer_device: str = "auto"
    """Where θ_global and the outer momentum live: cpu, a CUDA device, or auto (the GPU the model is on when
    they fit in a third of its free memory, else cpu). The sync itself runs on the model's device."""

    def __post_init__(self) -> None:
        t = self.TABLE
        if self.model not in SIZES and not is_hf(self.model):
            raise ValueError(f"{t}.model must be one of {', '.join(SIZES)} or hf:PATH_OR_NAME, got {self.model!r}")
        if self.steps < 1 or self.sync_every < 1:
            raise ValueError(f"{t}.steps ({self.steps}) and {t}.sync_every ({self.sync_every}) must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"{t}.lr must be > 0 and {t}.warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"{t}.weight_decay and {t}.grad_clip must be >= 0 (grad_clip 0: off)")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"{t}.shard_index must be in [0, {t}.shard_count = {self.shard_count}), "
                             f"got {self.shard_index}")


FLAGS = {
    "sync_every": "--inner-steps",
    "outer.lr": "--outer-lr",
    "outer.momentum": "--outer-momentum",
    "outer.feedback_decay": "--feedback-decay",
    "codec.name": "--codec",
    "data.paths": "--data",
    "data.batch_size": "--batch-size",
    "data.seq_len": "--seq-len",
}
"""Field -> the flag name it had before flags were generated, still accepted next to `--sync-every` etc."""
FILE_ONLY = frozenset({"shard_index", "shard_count"})
"""Fields without a flag: `swarm peer --shard I/N` sets both, `swarm local` gives each peer its shard."""
