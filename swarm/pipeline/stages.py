"""How the built-in model is cut into pipeline stages.

A `ByteLM` of L identical blocks is cut into S stages of L / S consecutive blocks each, so every
stage's blocks have the same parameter shapes (what CheckFree needs to rebuild one stage from its
neighbours). The first stage also owns the token embedding, the last the final norm and the output
head (the "extras"); with S = 1 one stage owns everything.

A stage's weights are addressed by stage-relative names: block j of the stage (0-based inside the
stage) is `blocks.{j}.<rest>`, the extras keep the model's names (`embed.weight`, `norm.weight`,
`head.weight`). Two stages' block weights therefore have the same keys and shapes and can be averaged
or copied key by key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from swarm.task.model import ByteLM

_FIRST_EXTRAS = ("embed",)
_LAST_EXTRAS = ("norm", "head")


@dataclass(frozen=True, slots=True)
class StageLayout:
    """Which blocks and end modules each of `n_stages` stages owns."""

    n_stages: int
    """S: number of pipeline stages."""
    blocks_per_stage: int
    """Consecutive transformer blocks per stage, the same for every stage."""

    def __post_init__(self) -> None:
        if self.n_stages < 1 or self.blocks_per_stage < 1:
            raise ValueError(
                f"a StageLayout needs n_stages >= 1 and blocks_per_stage >= 1, got {self.n_stages} and "
                f"{self.blocks_per_stage}"
            )

    @property
    def n_blocks(self) -> int:
        """Blocks in the whole model."""
        return self.n_stages * self.blocks_per_stage

    def blocks(self, stage: int) -> range:
        """Model block indices of `stage`."""
        self._check(stage)
        return range(stage * self.blocks_per_stage, (stage + 1) * self.blocks_per_stage)

    def is_first(self, stage: int) -> bool:
        """The stage owns the token embedding."""
        self._check(stage)
        return stage == 0

    def is_last(self, stage: int) -> bool:
        """The stage owns the final norm and the output head."""
        self._check(stage)
        return stage == self.n_stages - 1

    def extras(self, stage: int) -> tuple[str, ...]:
        """Names of the end modules `stage` owns besides its blocks (empty for a middle stage)."""
        names: tuple[str, ...] = ()
        if self.is_first(stage):
            names += _FIRST_EXTRAS
        if self.is_last(stage):
            names += _LAST_EXTRAS
        return names

    def _check(self, stage: int) -> None:
        if not 0 <= stage < self.n_stages:
            raise ValueError(f"stage must be in [0, {self.n_stages}), got {stage}")


def split_stages(model: ByteLM, n_stages: int) -> StageLayout:
    """Cut `model` into `n_stages` stages of equally many whole blocks.

    Args:
        model: the model to cut.
        n_stages: S, at least 1.

    Returns:
        The layout.

    Raises:
        ValueError: n_stages < 1 or the model's block count is not a multiple of it.
    """
    n_layers = len(model.blocks)
    if n_stages < 1 or n_layers % n_stages:
        raise ValueError(
            f"cannot cut {n_layers} blocks into {n_stages} stages of equal size; pick a stage count that "
            f"divides model.n_layers ({n_layers}) or build a model with n_layers a multiple of {n_stages}"
        )
    return StageLayout(n_stages=n_stages, blocks_per_stage=n_layers // n_stages)


def stage_parameters(
    model: ByteLM, layout: StageLayout, stage: int, *, blocks_only: bool = False
) -> dict[str, nn.Parameter]:
    """The live parameters of one stage under stage-relative names.

    Args:
        model: the cut model.
        layout: how it is cut.
        stage: which stage.
        blocks_only: leave out the extras (embedding, final norm, head).

    Returns:
        name -> the model's own Parameter (training it trains the model), blocks first in order.
    """
    params: dict[str, nn.Parameter] = {}
    for local, index in enumerate(layout.blocks(stage)):
        for name, param in model.blocks[index].named_parameters():
            params[f"blocks.{local}.{name}"] = param
    if not blocks_only:
        for module_name in layout.extras(stage):
            for name, param in getattr(model, module_name).named_parameters():
                params[f"{module_name}.{name}"] = param
    return params


def stage_state(model: ByteLM, layout: StageLayout, stage: int, *, blocks_only: bool = False) -> dict[str, torch.Tensor]:
    """Detached views of one stage's weights (they share memory with the model: clone to keep them).

    Args:
        model: the cut model.
        layout: how it is cut.
        stage: which stage.
        blocks_only: leave out the extras.

    Returns:
        Stage-relative name -> tensor view.
    """
    return {name: p.detach() for name, p in stage_parameters(model, layout, stage, blocks_only=blocks_only).items()}


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deep copy of a weights dict (new memory for every tensor)."""
    return {name: t.detach().clone() for name, t in state.items()}


@torch.no_grad()
def load_stage_state(model: ByteLM, layout: StageLayout, stage: int, state: dict[str, torch.Tensor]) -> None:
    """Write weights into one stage of the model in place.

    `state` may hold the stage's blocks only, or blocks and extras; every key it holds must belong to
    the stage, and every block key of the stage must be present.

    Args:
        model: the cut model.
        layout: how it is cut.
        stage: which stage to overwrite.
        state: stage-relative name -> tensor of the parameter's shape.

    Raises:
        ValueError: a key does not belong to the stage, a block key is missing, or a shape differs.
    """
    params = stage_parameters(model, layout, stage)
    unknown = state.keys() - params.keys()
    missing = stage_parameters(model, layout, stage, blocks_only=True).keys() - state.keys()
    if unknown or missing:
        raise ValueError(
            f"weights for stage {stage} do not fit it: unknown keys {sorted(unknown)[:4]}, missing block keys "
            f"{sorted(missing)[:4]}; build them with stage_state() of a model cut the same way"
        )
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise ValueError(f"stage {stage} {name}: shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def state_nbytes(state: dict[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes the tensors of a weights dict (or an iterable of tensors) occupy."""
    tensors = state.values() if isinstance(state, dict) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def stage_forward(model: ByteLM, layout: StageLayout, x: torch.Tensor, stage: int, *, ends: bool = True) -> torch.Tensor:
    """What one stage computes on one microbatch.

    Args:
        model: the cut model.
        layout: how it is cut.
        x: hidden states [B, T, dim]; token ids [B, T] for the first stage when `ends`.
        stage: which stage runs.
        ends: also run the extras: embed the tokens on the first stage, produce logits on the last.
            False runs the blocks only (the out-of-order schedule runs the extras separately).

    Returns:
        Hidden states [B, T, dim], or logits [B, T, vocab] from the last stage when `ends`.
    """
    blocks = layout.blocks(stage)
    if ends and layout.is_first(stage):
        x = model.embed_tokens(x)
    x = model.run_blocks(x, blocks.start, blocks.stop)
    if ends and layout.is_last(stage):
        x = model.logits(x)
    return x


def pipeline_forward(model: ByteLM, layout: StageLayout, tokens: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """A whole forward pass with the stages' blocks run in `order` (see `schedule.block_order`).

    The embedding (first stage's) runs before, the final norm and head (last stage's) after, whatever
    the order; with `order = range(S)` this equals `model(tokens)`.

    Args:
        model: the cut model.
        layout: how it is cut.
        tokens: token ids [B, T].
        order: a permutation of range(S).

    Returns:
        Logits [B, T, vocab].

    Raises:
        ValueError: order is not a permutation of the stages.
    """
    if sorted(order) != list(range(layout.n_stages)):
        raise ValueError(f"order must be a permutation of range({layout.n_stages}), got {list(order)}")
    h = model.embed_tokens(tokens)
    for stage in order:
        h = stage_forward(model, layout, h, stage, ends=False)
    return model.logits(h)
