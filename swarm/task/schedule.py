"""The inner learning-rate schedule shared by every training path: linear warmup, then cosine to 10 %."""

from __future__ import annotations

import math
from typing import Protocol


class Schedule(Protocol):
    """The settings the schedule reads (`TrainConfig` and `PipelineConfig` both have them)."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int
    """Steps of linear warmup."""
    steps: int
    """Steps of the run; the cosine reaches 10 % of the peak there."""


def inner_lr(config: Schedule, step: int) -> float:
    """Warmup then cosine to 10 % of the peak, by global step.

    Args:
        config: peak lr, warmup steps and the run's steps.
        step: the global inner step (0-based).

    Returns:
        The learning rate for `step`.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
