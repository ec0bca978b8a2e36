"""Finding a chunk's threshold T, the k-th largest |acc|, for the top-k encode kernel (`topk.py`).

|acc| is handled as its fp32 bit pattern in an int32: non-negative floats order like their bits as
integers, so thresholds are integers and a search halves or quarters an integer range. T is bounded
from below by `bounds` (one pass over the chunk in registers), then pinned by the four-way search:
`quarters` cuts [lo, hi] at three thresholds, `count3` / `count3_small` count the values at or above
each in one reduction, and `search_step` keeps the quarter that holds T.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def magnitude_bits(acc):
    """Bit pattern of |acc| as int32: for finite fp32 it orders exactly as |acc| does.

    NaN patterns (GPUs produce 0x7FFFFFFF) are clamped to Inf's, so the search below never sees a
    range wide enough to overflow int32; such input is rejected anyway.
    """
    return tl.minimum(acc.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800000)


@triton.jit
def bounds(u0, C: tl.constexpr, SETS: tl.constexpr, RANK: tl.constexpr):
    """(max, lo) of a chunk's magnitudes `u0` ([C // 4, 4]: rows of 4 consecutive values): T <= max
    and T >= lo, the least of the RANK-th largest values of SETS disjoint sets (SETS * RANK >= k).

    Each set has RANK distinct entries at or above its RANK-th largest (ties at a set's larger values
    are dropped, which only lowers it), so together they are k entries >= lo. A set is the rows
    r % SETS == s: in the [rows, 4] layout a thread holds rows t, t + 128, ..., so each set stays
    within the threads of one lane (a reduction over registers, then across warps). SETS = 0: lo = 0.
    """
    if SETS > 0:
        u3 = tl.reshape(u0, [C // (4 * SETS), SETS, 4])
        top = tl.max(tl.max(u3, axis=2), axis=0)
        umax = tl.max(top, axis=0)
        for _ in tl.static_range(RANK - 1):  # the next lower value of each set (ties at top dropped)
            top = tl.max(tl.max(tl.where(u3 < top[None, :, None], u3, -1), axis=2), axis=0)
        lo = tl.min(top, axis=0)
    else:
        umax = tl.max(tl.reshape(u0, [C]), axis=0)
        lo = tl.full([], 0, tl.int32)
    return umax, lo


@triton.jit
def _fields3(u, t1, t2, t3):
    """u >= t1, t2, t3 as one int64 per value: 21-bit fields (sums of up to 2**21 - 1 values)."""
    a = (tl.where(u >= t1, 1, 0) + tl.where(u >= t2, 0x200000, 0)).to(tl.int64)
    return a + tl.where(u >= t3, 0x40000000000, 0).to(tl.int64)


@triton.jit
def _split3(s):
    return (s & 0x1FFFFF).to(tl.int32), ((s >> 21) & 0x1FFFFF).to(tl.int32), (s >> 42).to(tl.int32)


@triton.jit
def count3(u, t1, t2, t3, N: tl.constexpr):
    """Counts of u >= t1, t2, t3 (t1 <= t2 <= t3) over the N values of `u`, in one reduction."""
    return _split3(tl.sum(tl.reshape(_fields3(u, t1, t2, t3), [N]), axis=0))


@triton.jit
def count3_small(u, t1, t2, t3):
    """`count3` for at most 1,023 values of a 1-D `u`: 10-bit fields of an int32 (half the work)."""
    s = tl.sum(tl.where(u >= t1, 1, 0) + tl.where(u >= t2, 1 << 10, 0) + tl.where(u >= t3, 1 << 20, 0), axis=0)
    return s & 0x3FF, (s >> 10) & 0x3FF, s >> 20


@triton.jit
def search_step(lo, hi, above, c_lo, c1, c2, c3, t1, t2, t3, K: tl.constexpr):
    """Keep the quarter of [lo, hi] that holds T given the counts at t1 <= t2 <= t3.

    Invariants: #(u >= lo) = c_lo >= K, T in [lo, hi], #(u > hi) = above < K.
    """
    b3 = c3 >= K
    b2 = c2 >= K
    b1 = c1 >= K
    new_lo = tl.where(b3, t3, tl.where(b2, t2, tl.where(b1, t1, lo)))
    new_hi = tl.where(b3, hi, tl.where(b2, t3 - 1, tl.where(b1, t2 - 1, t1 - 1)))
    new_above = tl.where(b3, above, tl.where(b2, c3, tl.where(b1, c2, c1)))
    new_c_lo = tl.where(b3, c3, tl.where(b2, c2, tl.where(b1, c1, c_lo)))
    return new_lo, new_hi, new_above, new_c_lo


@triton.jit
def quarters(lo, hi):
    """Thresholds lo < t1 <= t2 <= t3 <= hi (for lo < hi) cutting [lo, hi] in quarters, for `search_step`."""
    q = (hi - lo + 3) >> 2
    t1 = lo + q
    t2 = tl.minimum(t1 + q, hi)
    return t1, t2, tl.minimum(t2 + q, hi)
