"""CheckFree+'s out-of-order schedule: the order in which the block stages run a microbatch.

On even microbatches the block stages run in their natural order. On odd microbatches (when the
schedule is on) the first two block stages trade places, and so do the last two:
`[1, 0, 2, ..., S-3, S-1, S-2]`. Stage 0 thereby also learns to compute what stage 1 computes and
vice versa (likewise S-2 and S-1), so a lost first or last block stage can be replaced by a copy of
its partner, which has no second neighbour to average with.
"""

from __future__ import annotations


def is_swapped(microbatch_index: int) -> bool:
    """Whether microbatch `microbatch_index` (0-based within the step) runs out of order: the odd ones."""
    if microbatch_index < 0:
        raise ValueError(f"microbatch_index must be >= 0, got {microbatch_index}")
    return microbatch_index % 2 == 1


def block_order(n_block_stages: int, microbatch_index: int, swap: bool) -> list[int]:
    """The order in which the block stages process one microbatch.

    Args:
        n_block_stages: number of block stages; 1, 2 or at least 4 when `swap` (with 3 the first and
            the last pair share the middle stage and "swap both pairs" has no meaning).
        microbatch_index: the microbatch's index within its step, 0-based.
        swap: use the out-of-order schedule (CheckFree+); False always gives the natural order.

    Returns:
        A permutation of range(n_block_stages): natural order, or on odd microbatches with `swap` the
        first two and the last two entries exchanged (`[1, 0]` for two stages, `[0]` for one).

    Raises:
        ValueError: n_block_stages < 1, microbatch_index < 0, or 3 block stages with `swap`.
    """
    if n_block_stages < 1:
        raise ValueError(f"n_block_stages must be >= 1, got {n_block_stages}")
    order = list(range(n_block_stages))
    if not swap:
        return order
    if n_block_stages == 3:
        raise ValueError(
            "the out-of-order schedule needs 1, 2 or at least 4 block stages (with 3 the swapped pairs overlap); "
            "use another stage count or the checkfree method"
        )
    if is_swapped(microbatch_index) and n_block_stages >= 2:
        order[0], order[1] = order[1], order[0]
        if n_block_stages >= 4:
            order[-2], order[-1] = order[-1], order[-2]
    return order


def swap_partner(stage: int, n_block_stages: int) -> int | None:
    """The block stage that `stage` trades places with on odd microbatches, or None (a middle stage).

    Args:
        stage: a block stage index.
        n_block_stages: number of block stages.

    Returns:
        1 for 0 and 0 for 1, n-1 for n-2 and n-2 for n-1; None when the stage never moves
        (a middle stage, or the only stage).

    Raises:
        ValueError: stage out of range, or 3 block stages (no valid swap schedule).
    """
    if not 0 <= stage < n_block_stages:
        raise ValueError(f"stage must be in [0, {n_block_stages}), got {stage}")
    if n_block_stages == 3:
        raise ValueError("the out-of-order schedule is not defined for 3 block stages")
    if n_block_stages == 1:
        return None
    pairs = {0: 1, 1: 0, n_block_stages - 1: n_block_stages - 2, n_block_stages - 2: n_block_stages - 1}
    return pairs.get(stage)
