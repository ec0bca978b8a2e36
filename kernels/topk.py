"""Chunked top-k codec with fused error feedback as Triton kernels, bit-exact with docs/codecs.md.

Payload: ``[scale: f32 x nc][index words: u32 x nc*k*ib/32][value words: u32 x nc*k*b/32]`` for
``nc = ceil(n / chunk)`` chunks, ``ib = log2(chunk)`` index bits and ``b`` value bits.

Usage::

    from swarm.kernels import topk_encode, topk_decode

    # Error feedback fused in: acc = x + residual; payload = encode(acc); residual = acc - decode(payload)
    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2)      # residual updated in place
    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2, residual_out=new)  # one pass, see below
    y = topk_decode(payload, x.numel(), chunk=4096, k=64, bits=2)      # zeros except the selection
    topk_decode(payload, n, chunk=4096, k=64, bits=2, out=acc, accumulate=True)   # acc += decoded

Encode is one kernel on a persistent grid (as many programs as the GPU runs at once, each walking
chunks pid, pid + grid, ...). Per chunk (at most 4,096 values: 32 per thread), |acc| = |x + residual|
as fp32 bit patterns (non-negative floats order like their bits as integers) in registers:

1. The chunk max (the scale, and the value check: NaN/Inf, or a decode that would overflow) and a
   lower bound `lo` on the threshold T, the k-th largest: split into S strided sets (index % S,
   S * R >= k), each set's R-th largest value (R = 2; ties at a set's larger values are dropped,
   which only lowers it) has R distinct entries of that set at or above it, so T >= the smallest.
2. Candidates: the entries >= lo, about 190 of 4,096 for normal data and k = 64 (the set maxima
   alone, R = 1, left about 290). While there are more than CAP (256, or 2k), a four-way search
   pass over the chunk raises lo: it counts at three thresholds in one reduction and keeps a
   quarter of [lo, hi]. With R = 2 about 7 % of normal chunks need it, against 65 % with R = 1
   (`scripts/sweep_topk_kernel.py --bound-only`).
3. In sub-tiles of 1,024, re-read from cache (fewer registers than keeping `acc`): every entry's
   residual is written as `acc` (what it is unless selected: unselected entries decode to 0), and
   the candidates go with their index (one int64 each: index << 32 | acc bits), in index order,
   to a per-program scratch of CAP entries (it stays in L2). Their places come from prefix counts
   over rows of 4 consecutive values (a thread's own, scanned in registers) plus one scan over the
   rows' totals: a quarter of the cross-thread scan steps of one scan over the whole sub-tile.
4. On the candidates only: the rest of the four-way search gives T exactly; selected are the
   entries above T, plus the lowest-index entries equal to T up to k in all, and a prefix count
   over the candidates gives each its slot (ascending index order, no sort). They are quantized,
   their residual `acc - decode` overwrites step 3's (ordered by a barrier), and they go to a k-slot
   scratch from which the index and value words are built in registers (plain stores, no atomics).

If ties at T leave no threshold with at most CAP entries above it, step 2 runs to the exact T and
step 3 copies the k selected entries themselves (correct, slower).

The value check needs every chunk before any residual may change (a rejected call leaves the state
untouched). With `residual_out` the new residual goes to another tensor, so the check is the
encode pass itself and x and the residual are read from memory once. In place, a check kernel runs
first (one more read of both) and the encode kernel stores nothing if it flagged.

Chunks above 4,096 values (no preset uses them) are encoded by the PyTorch reference; a tiled
kernel for them failed a GPU test and was taken out (decode takes every chunk size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swarm.compression import ErrorFeedback, TopKCodec
from swarm.kernels._common import (
    LAUNCH_OPTIONS,
    _not_finite,
    _rne,
    check_async,
    check_payload,
    flat_f32,
    raise_for_flag,
    resident_programs,
)

MAX_KERNEL_CHUNK = 4096
"""Largest chunk the encode kernel takes (32 values per thread in registers); larger chunks are
encoded by the PyTorch reference (see `encode`)."""
# Both from scripts/sweep_topk_kernel.py on an H200 at 2**30 values (sparseloco, every setting bit-exact
# with the reference): 1,024 / 256 took 7.95 ms against 9.78 ms for the earlier 512 / 512.
_MIN_CAP = 256  # candidates kept for the search on the candidates (at least 2k)
_SUB = 1024  # values per step of the encode's compaction pass (reloaded from cache: fewer registers)
# _SET_RANK and _ROW also from scripts/sweep_topk_kernel.py on an H200 at 2**30 values: 5.90 ms
# against 7.50 ms for (1, 0), the earlier kernel, in the same call (docs/benchmarks.md).
_MIN_SETS = 64  # sets x rank: the entries whose least bounds T from below, at least k of them
_SET_RANK = 2  # the bound is the least of the sets' _SET_RANK-th largest values (sets: _MIN_SETS / rank)
_ROW = 4  # > 0: the compaction pass scans rows of _ROW consecutive values, then the rows' totals
_DECODE_SLOTS = 2048  # (chunk, slot) pairs decoded per step of a program
_ZERO_TILE = 4096  # values zeroed per step of a decode program


def check_params(chunk: int, k: int, bits: int) -> None:
    """Raise ValueError unless (chunk, k, bits) is a topk configuration of docs/codecs.md."""
    if not (256 <= chunk <= 65536 and chunk & (chunk - 1) == 0):
        raise ValueError(f"topk: chunk must be a power of two in 256..65536, got {chunk}")
    if not (0 < k <= chunk and k % 32 == 0):
        raise ValueError(f"topk: k must be a positive multiple of 32 and <= chunk={chunk}, got {k}")
    if bits not in (2, 4, 8):
        raise ValueError(f"topk: bits must be 2, 4 or 8, got {bits}")


def _layout(n: int, chunk: int, k: int, bits: int) -> tuple[int, int, int, int]:
    """(chunks, index bits, index words per chunk, value words per chunk)."""
    ib = chunk.bit_length() - 1
    return triton.cdiv(n, chunk), ib, k * ib // 32, k * bits // 32


def payload_nbytes(n: int, *, chunk: int, k: int, bits: int) -> int:
    """Bytes of the topk payload of `n` values for these parameters."""
    check_params(chunk, k, bits)
    nc, _, iwords, vwords = _layout(n, chunk, k, bits)
    return 4 * nc * (1 + iwords + vwords)


def _views(payload: torch.Tensor, n: int, chunk: int, k: int, bits: int) -> tuple[torch.Tensor, ...]:
    nc, _, iwords, _ = _layout(n, chunk, k, bits)
    a, b = 4 * nc, 4 * nc * (1 + iwords)
    return payload[:a].view(torch.float32), payload[a:b].view(torch.int32), payload[b:].view(torch.int32)


def _encode_options() -> dict[str, int]:
    """Launch options of the encode kernel: 4 warps, at most 96 registers per thread.

    The cap lets 5 programs share an SM instead of 4 (126 registers uncapped), with no spills that
    cost more than they save: 7.14 ms against 7.59 at 2**30 values on an H200
    (scripts/sweep_topk_kernel.py, docs/benchmarks.md).
    """
    return {"num_warps": 4, "maxnreg": 96}


def _capacity(chunk: int, k: int) -> int:
    """Candidate slots per program: at least 2k (and _MIN_CAP), at most the chunk."""
    return min(chunk, max(_MIN_CAP, 2 * triton.next_power_of_2(k)))


@triton.jit
def _tile_acc(xb, rb, offs, rem, HAS_RES: tl.constexpr, MASKED: tl.constexpr):
    """acc = x + residual at chunk offsets `offs` (int32) from the chunk's pointers; with MASKED,
    zeros from `rem` on (the spec's padding)."""
    if MASKED:
        acc = tl.load(xb + offs, mask=offs < rem, other=0.0)
        if HAS_RES:
            acc = acc + tl.load(rb + offs, mask=offs < rem, other=0.0)
    else:
        acc = tl.load(xb + offs)
        if HAS_RES:
            acc = acc + tl.load(rb + offs)
    return acc


@triton.jit
def _store_tile(ob, offs, v, rem, live, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ob + offs, v, mask=(offs < rem) & live)
    else:
        tl.store(ob + offs, v, mask=live)


@triton.jit
def _magnitude_bits(acc):
    """Bit pattern of |acc| as int32: for finite fp32 it orders exactly as |acc| does.

    NaN patterns (GPUs produce 0x7FFFFFFF) are clamped to Inf's, so the search below never sees a
    range wide enough to overflow int32; such input is rejected anyway.
    """
    return tl.minimum(acc.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800000)


@triton.jit
def _fields3(u, t1, t2, t3):
    """u >= t1, t2, t3 as one int64 per value: 21-bit fields (sums of up to 2**21 - 1 values)."""
    a = (tl.where(u >= t1, 1, 0) + tl.where(u >= t2, 0x200000, 0)).to(tl.int64)
    return a + tl.where(u >= t3, 0x40000000000, 0).to(tl.int64)


@triton.jit
def _split3(s):
    return (s & 0x1FFFFF).to(tl.int32), ((s >> 21) & 0x1FFFFF).to(tl.int32), (s >> 42).to(tl.int32)


@triton.jit
def _count3(u, t1, t2, t3):
    """Counts of u >= t1, t2, t3 (t1 <= t2 <= t3) over a 1-D `u`, in one reduction."""
    return _split3(tl.sum(_fields3(u, t1, t2, t3), axis=0))


@triton.jit
def _count3_small(u, t1, t2, t3):
    """`_count3` for at most 1,023 values: 10-bit fields of an int32 (half the work)."""
    s = tl.sum(tl.where(u >= t1, 1, 0) + tl.where(u >= t2, 1 << 10, 0) + tl.where(u >= t3, 1 << 20, 0), axis=0)
    return s & 0x3FF, (s >> 10) & 0x3FF, s >> 20


@triton.jit
def _search_step(lo, hi, above, c_lo, c1, c2, c3, t1, t2, t3, K: tl.constexpr):
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
def _quarters(lo, hi):
    """Thresholds lo < t1 <= t2 <= t3 <= hi (for lo < hi) cutting [lo, hi] in quarters, for `_search_step`."""
    q = (hi - lo + 3) >> 2
    t1 = lo + q
    t2 = tl.minimum(t1 + q, hi)
    return t1, t2, tl.minimum(t2 + q, hi)


@triton.jit
def _quantize(acc, scale, L1: tl.constexpr):
    """(code, decoded value) of `acc` in a chunk of this scale, each step rounded as the reference's:
    c = clamp(rne(((v / scale + 1) * (L - 1)) / 2), 0, L - 1); decode ((2c - (L - 1)) * scale) / (L - 1)."""
    zero = scale == 0.0
    y = tl.math.div_rn((tl.math.div_rn(acc, tl.where(zero, 1.0, scale)) + 1.0) * L1, 2.0)
    code = tl.minimum(tl.maximum(_rne(y), 0.0), L1 * 1.0)
    code = tl.where(zero, 0.0, code).to(tl.int32)
    dec = tl.math.div_rn((2 * code - L1).to(tl.float32) * scale, L1 * 1.0)
    return code, dec


@triton.jit
def _pack_chunk(slot_ptr, iw_ptr, vw_ptr, stop, K: tl.constexpr, KP: tl.constexpr, IB: tl.constexpr, B: tl.constexpr):
    """Index and value words of one chunk from its k slots (`idx | code << 16`, in slot order);
    nothing is stored when `stop` is non-zero."""
    s = tl.arange(0, KP)  # KP = K rounded up to a power of two
    packed = tl.load(slot_ptr + s, mask=s < K, other=0)
    idx = (packed & 0xFFFF).to(tl.uint32)
    code = (packed >> 16).to(tl.uint32)

    # Value words: B divides 32, so 32 / B consecutive slots fill one word exactly. The fields are
    # disjoint bits, so summing them is OR-ing them.
    PER: tl.constexpr = 32 // B
    fields = tl.reshape(code, [KP // PER, PER])
    vwords = tl.sum(fields << (tl.arange(0, PER) * B).to(tl.uint32)[None, :], axis=1)
    wid = tl.arange(0, KP // PER)
    wlive = (stop + tl.zeros([KP // PER], dtype=tl.int32)) == 0  # (the interpreter mis-broadcasts a bool scalar)
    tl.store(vw_ptr + wid, vwords.to(tl.int32, bitcast=True), mask=(wid < K // PER) & wlive)

    # Index words: every 32 slots fill IB words; a field may straddle two words.
    fields = tl.reshape(idx, [KP // 32, 32])
    bit = tl.arange(0, 32) * IB
    word_of = (bit >> 5)[None, :]
    shift = (bit & 31)[None, :]
    spill = shift + IB > 32
    grp = tl.arange(0, KP // 32)
    glive = (stop + tl.zeros([KP // 32], dtype=tl.int32)) == 0
    for w in tl.static_range(IB):
        low = tl.where(word_of == w, fields << shift.to(tl.uint32), 0)
        high = tl.where(spill & (word_of + 1 == w), fields >> tl.where(spill, 32 - shift, 0).to(tl.uint32), 0)
        word = tl.sum(low | high, axis=1)
        tl.store(iw_ptr + grp * IB + w, word.to(tl.int32, bitcast=True), mask=(grp < K // 32) & glive)


@triton.jit
def _encode_kernel(
    x_ptr,
    r_ptr,
    rout_ptr,
    scale_ptr,
    iw_ptr,
    vw_ptr,
    scratch_ptr,
    flag_ptr,
    n,
    c0,
    c1,
    C: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    CAP: tl.constexpr,
    IB: tl.constexpr,
    B: tl.constexpr,
    SUB: tl.constexpr,
    SETS: tl.constexpr,
    RANK: tl.constexpr,
    ROW: tl.constexpr,
    HAS_RES: tl.constexpr,
    CHECK: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Chunks c0 + pid, c0 + pid + grid, ... below c1: scale, index and value words, new residual.

    CHECK: OR the value-check bits of every chunk into `*flag_ptr` and write regardless (the caller
    discards the outputs when it is set). Otherwise `*flag_ptr` was set by a check kernel queued
    before this one on the same stream: when set, nothing is stored at all. MASKED: chunks may end
    past `n` (the last one); without it no access is masked.
    """
    L1: tl.constexpr = (1 << B) - 1
    pid = tl.program_id(0)
    # One value per thread and access (4-byte loads, still 128 bytes per warp): the layout of the
    # candidates' scattered stores too, so the tile never goes through shared memory to change layout.
    lane = tl.max_contiguous(tl.arange(0, C), 1)
    if ROW > 0:  # sub-tiles as [SUB // ROW, ROW] rows of consecutive values: a row scan, then one over rows
        sub = (tl.arange(0, SUB // ROW) * ROW)[:, None] + tl.max_contiguous(tl.arange(0, ROW), ROW)[None, :]
    else:
        sub = tl.max_contiguous(tl.arange(0, SUB), 1)
    ci = tl.arange(0, CAP)
    # This program's scratch (int64): CAP candidates (chunk index << 32 | acc bits), then the k slots.
    cand = scratch_ptr + pid.to(tl.int64) * (CAP + KP)
    slots = cand + CAP
    if CHECK:
        stop = tl.full([], 0, tl.int32)
    else:
        stop = tl.load(flag_ptr)
    live_s = (stop + tl.zeros_like(sub)) == 0  # (the interpreter mis-broadcasts a bool scalar)
    live_c = (stop + tl.zeros([CAP], dtype=tl.int32)) == 0

    for i in range(c0 + pid, c1, tl.num_programs(0)):
        chunk = tl.zeros([], dtype=tl.int64) + i  # int64 offsets (the interpreter's `i` is a Python int)
        base = chunk * C
        # Scalar chunk pointers plus int32 offsets: per-element addresses cost no registers.
        xb = x_ptr + base
        rb = r_ptr + base
        ob = rout_ptr + base
        rem = tl.minimum(n - base, C).to(tl.int32)  # values of this chunk before the padding
        # Every thread has read the last chunk's scratch (its reads fed reductions since), but keep
        # the rewrite below ordered after them explicitly.
        tl.debug_barrier()
        u0 = _magnitude_bits(_tile_acc(xb, rb, lane, rem, HAS_RES, MASKED))  # in registers through the search

        # 1. Scale and bounds of T: T <= max, and T >= the smallest of the maxima of SETS >= k
        # disjoint sets (they are distinct entries): the sets are strided, e % SETS, which keeps
        # most of each within a thread.
        umax = tl.max(u0, axis=0)
        if SETS > 0:
            u2 = tl.reshape(u0, [C // SETS, SETS])
            m = tl.max(u2, axis=0)
            for _ in tl.static_range(RANK - 1):  # the next lower value of each set (ties at m dropped)
                m = tl.max(tl.where(u2 < m[None, :], u2, -1), axis=0)
            lo = tl.min(m, axis=0)
        else:
            lo = tl.full([], 0, tl.int32)
        scale = umax.to(tl.float32, bitcast=True)
        if CHECK:  # NONFINITE (1): NaN/Inf; OVERFLOW (2): (L - 1) * max overflows, as the check kernel's
            bad = tl.where(umax >= 0x7F800000, 1, tl.where(_not_finite(scale * L1), 2, 0))
            tl.atomic_or(flag_ptr, bad, mask=bad > 0, sem="relaxed")

        # 2. Four-way search over the whole chunk until at most CAP entries are >= lo (none when a
        # check kernel rejected the input).
        hi = tl.where(stop == 0, umax, lo)
        c_lo = tl.sum(tl.where(u0 >= lo, 1, 0), axis=0)
        above = tl.full([], 0, tl.int32)
        while (lo < hi) & (c_lo > CAP):
            t1, t2, t3 = _quarters(lo, hi)
            n1, n2, n3 = _count3(u0, t1, t2, t3)  # not c1: that is the chunk bound argument
            lo, hi, above, c_lo = _search_step(lo, hi, above, c_lo, n1, n2, n3, t1, t2, t3, K)
        # Candidates: the entries >= lo (thr = lo - 1, need = 0); or, if ties kept more than CAP
        # there, the k selected entries themselves: above T = lo, and the first `need` equal to it.
        few = c_lo <= CAP
        thr = tl.where(few, lo - 1, lo)
        need = tl.where(few, 0, K - above)

        # 3. In sub-tiles reloaded from cache (few registers): every entry's residual is `acc` but
        # for the k selected, which step 4 overwrites (after barriers: ordered); the candidates go
        # to the scratch in index order.
        seen_gt = tl.full([], 0, tl.int32)
        seen_eq = tl.full([], 0, tl.int32)
        for t in range(C // SUB):
            offs = t * SUB + sub
            acc = _tile_acc(xb, rb, offs, rem, HAS_RES, MASKED)
            if HAS_RES:
                _store_tile(ob, offs, acc, rem, live_s, MASKED)
            u = _magnitude_bits(acc)
            gt = (u > thr).to(tl.int32)
            eq = (u == thr).to(tl.int32)
            # One scan for both prefix counts: within a sub-tile each fits in 16 bits (SUB <= 8192).
            both = gt | (eq << 16)
            if ROW > 0:
                row_tot = tl.sum(both, axis=1)
                before = (tl.cumsum(row_tot, 0) - row_tot)[:, None] + tl.cumsum(both, 1) - both
                tot = tl.sum(row_tot, axis=0)
            else:
                before = tl.cumsum(both, 0) - both
                tot = tl.sum(both, axis=0)
            before_eq = seen_eq + (before >> 16)
            take = (gt != 0) | ((eq != 0) & (before_eq < need))
            pos = seen_gt + (before & 0xFFFF) + tl.minimum(before_eq, need)
            keep = take & (pos < CAP) & live_s
            packed = (offs.to(tl.int64) << 32) | (acc.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
            tl.store(cand + pos, packed, mask=keep)
            seen_gt += tot & 0xFFFF
            seen_eq += tot >> 16
        m = tl.minimum(seen_gt + tl.minimum(seen_eq, need), CAP)
        tl.debug_barrier()  # the scratch written above is read back by other threads

        # 4. On the candidates: T exactly, the selection and its slots, quantize, residual, pack.
        cm = (ci < m) & live_c
        packed_c = tl.load(cand + ci, mask=cm, other=0)
        acc_c = packed_c.to(tl.int32).to(tl.float32, bitcast=True)  # the low word
        idx_c = (packed_c >> 32).to(tl.int32)
        u_c = tl.where(cm, _magnitude_bits(acc_c), -1)  # -1: below every threshold
        while lo < hi:
            t1, t2, t3 = _quarters(lo, hi)
            if CAP < 1024:
                n1, n2, n3 = _count3_small(u_c, t1, t2, t3)
            else:
                n1, n2, n3 = _count3(u_c, t1, t2, t3)
            lo, hi, above, c_lo = _search_step(lo, hi, above, c_lo, n1, n2, n3, t1, t2, t3, K)
        # #(|acc| > T) = above < K <= #(|acc| >= T): take the `need` lowest-index entries equal to T.
        need = K - above
        gt = (u_c > lo).to(tl.int32)
        eq = (u_c == lo).to(tl.int32)
        if CAP <= 8192:
            both = gt | (eq << 16)
            before = tl.cumsum(both, 0) - both
            before_gt = before & 0xFFFF
            before_eq = before >> 16
        else:
            before_gt = tl.cumsum(gt, 0) - gt
            before_eq = tl.cumsum(eq, 0) - eq
        sel = ((gt != 0) | ((eq != 0) & (before_eq < need))) & cm
        slot = before_gt + tl.minimum(before_eq, need)
        code, dec = _quantize(acc_c, scale, L1)
        if HAS_RES:
            tl.store(ob + idx_c, acc_c - dec, mask=sel & (idx_c < rem))
        # Slots are distinct, so these are plain stores; padding entries may be selected too.
        tl.store(slots + slot, idx_c | (code << 16), mask=sel)
        tl.store(scale_ptr + chunk, scale, mask=stop == 0)
        tl.debug_barrier()  # the slots written above are read back by other threads
        _pack_chunk(slots, iw_ptr + chunk * (K * IB // 32), vw_ptr + chunk * (K * B // 32), stop, K, KP, IB, B)


@triton.jit
def _slot_fields(iw_ptr, vw_ptr, slots, m, C: tl.constexpr, IB: tl.constexpr, B: tl.constexpr):
    """(chunk-local index as int64, value code) of `slots`, given each chunk's first words."""
    ibit = slots * IB
    ish = ibit & 31
    iw = iw_ptr + (ibit >> 5)
    idx = tl.load(iw, mask=m, other=0).to(tl.uint32, bitcast=True) >> ish.to(tl.uint32)
    if 32 % IB != 0:
        spill = ish + IB > 32
        hi = tl.load(iw + 1, mask=m & spill, other=0).to(tl.uint32, bitcast=True)
        idx = idx | (hi << tl.where(spill, 32 - ish, 0).to(tl.uint32))
    idx = (idx & (C - 1)).to(tl.int64)
    vbit = slots * B
    vw = tl.load(vw_ptr + (vbit >> 5), mask=m, other=0)
    code = ((vw.to(tl.uint32, bitcast=True) >> (vbit & 31).to(tl.uint32)) & ((1 << B) - 1)).to(tl.int32)
    return idx, code


@triton.jit
def _decode_kernel(
    scale_ptr,
    iw_ptr,
    vw_ptr,
    out_ptr,
    n,
    nc,
    C: tl.constexpr,
    K: tl.constexpr,
    IB: tl.constexpr,
    B: tl.constexpr,
    ROWS: tl.constexpr,
    SLOTS: tl.constexpr,
    ZTILE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """ROWS chunks: their k entries into `out` (added to it with ACCUMULATE, else over zeros the
    program writes first, so each value of `out` is written by one program, once to DRAM)."""
    L1: tl.constexpr = (1 << B) - 1
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # chunk ids
    rmask = rows < nc
    if not ACCUMULATE:
        z = tl.arange(0, ZTILE)
        for t in range(C // ZTILE):
            offs = rows[:, None] * C + t * ZTILE + z[None, :]
            tl.store(out_ptr + offs, tl.zeros([ROWS, ZTILE], dtype=tl.float32), mask=rmask[:, None] & (offs < n))
        # The selected entries overwrite zeros this program stored: the barrier orders the two stores.
        tl.debug_barrier()
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    iw_rows = iw_ptr + rows[:, None] * (K * IB // 32)
    vw_rows = vw_ptr + rows[:, None] * (K * B // 32)
    for s0 in range(0, K, SLOTS):
        slots = s0 + tl.arange(0, SLOTS)
        m2 = rmask[:, None] & (slots < K)[None, :]
        idx, code = _slot_fields(iw_rows, vw_rows, slots[None, :], m2, C, IB, B)
        dec = tl.math.div_rn((2 * code - L1).to(tl.float32) * scale[:, None], L1 * 1.0)
        pos = rows[:, None] * C + idx
        m = m2 & (pos < n)  # slots in the zero padding are dropped
        # Indices within a chunk are distinct in any payload the encoder wrote, so no two lanes touch
        # the same element (a corrupted payload with repeats gives unspecified values there, no crash).
        if ACCUMULATE:
            dec = tl.load(out_ptr + pos, mask=m, other=0.0) + dec
        tl.store(out_ptr + pos, dec, mask=m)


def encode(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    chunk: int,
    k: int,
    bits: int,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode `x + residual` into the topk payload and set the residual to what the payload misses.

    Args:
        x: contiguous fp32 tensor (read flat) on the kernel's device.
        residual: error-feedback state, contiguous fp32 with `x.numel()` elements; updated in place
            to `acc - decode(payload)` unless `residual_out` is given. None encodes `x` alone.
        chunk: chunk size C, a power of two in 256..65536. Above MAX_KERNEL_CHUNK (4096) the
            PyTorch reference encodes instead (same payload and residual, reference speed).
        k: entries kept per chunk, a multiple of 32, at most `chunk`.
        bits: value bits, 2, 4 or 8.
        out: optional uint8 tensor of `payload_nbytes(...)` bytes to write into.
        residual_out: optional fp32 tensor like `residual` (not the same one) that receives the new
            residual; `residual` is then only read. This is the fast path: the value check runs in
            the encode pass itself, so x and the residual are read once instead of twice.

    Returns:
        The payload (`out` when given).

    Raises:
        ValueError: `x + residual` holds NaN or Inf ("topk: input has NaN/Inf"), or values above
            about FLT_MAX / (2**bits - 1), whose decode would be Inf (the reference rejects those
            too); `residual` is then left untouched (`out` and `residual_out` hold unspecified
            values). Also for bad parameters or a malformed tensor.
    """
    check_params(chunk, k, bits)
    xf = flat_f32(x, "topk: x")
    n = xf.numel()
    rf = None
    if residual is not None:
        rf = flat_f32(residual, "topk: residual", xf.device)
        if rf.numel() != n:
            raise ValueError(f"topk: residual has {rf.numel()} elements but x has {n}")
    rout = rf
    if residual_out is not None:
        if rf is None:
            raise ValueError("topk: residual_out needs residual (the state it replaces); pass both or neither")
        rout = flat_f32(residual_out, "topk: residual_out", xf.device)
        if rout.numel() != n:
            raise ValueError(f"topk: residual_out has {rout.numel()} elements but x has {n}")
        if rout.data_ptr() == rf.data_ptr():
            raise ValueError("topk: residual_out must be another tensor than residual; omit it to update in place")
    nbytes = payload_nbytes(n, chunk=chunk, k=k, bits=bits)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=xf.device)  # every byte is written
    else:
        check_payload(out, nbytes, "topk", xf.device)
    if n == 0:
        return out
    if chunk > MAX_KERNEL_CHUNK:
        return _encode_reference(xf, rf, None if rout is rf else rout, out, chunk=chunk, k=k, bits=bits)
    nc, ib, _, _ = _layout(n, chunk, k, bits)
    scales, iwords, vwords = _views(out, n, chunk, k, bits)
    flag = torch.zeros(1, dtype=torch.int32, device=xf.device)
    fused = rout is not rf or rf is None  # the state being replaced is not overwritten: check in the pass
    if not fused:
        check_async(xf, rf, flag, (1 << bits) - 1)
    kp = triton.next_power_of_2(k)
    cap = _capacity(chunk, k)
    sets = max(kp, _MIN_SETS) // _SET_RANK
    consts = {
        "C": chunk, "K": k, "KP": kp, "CAP": cap, "IB": ib, "B": bits, "SUB": min(chunk, _SUB),
        "SETS": sets if 2 * _SET_RANK * sets <= chunk else 0,  # no bound from sets of too few values
        "RANK": _SET_RANK,
        "ROW": _ROW if 0 < _ROW < min(chunk, _SUB) else 0,
        "HAS_RES": rf is not None, "CHECK": fused, **_encode_options(), **LAUNCH_OPTIONS,
    }  # fmt: skip
    r_arg = rf if rf is not None else xf
    o_arg = rout if rout is not None else xf

    full = n // chunk  # chunks without padding: unmasked accesses

    def args(scratch: torch.Tensor, c0: int, c1: int) -> tuple:
        return (xf, r_arg, o_arg, scales, iwords, vwords, scratch, flag, n, c0, c1)

    # Persistent grid: each program owns a scratch of CAP candidates and k slots, reused chunk after
    # chunk (it stays in L2). The padded last chunk, if any, gets its own one-program launch after.
    dummy = torch.empty(1, dtype=torch.int64, device=xf.device)  # the scratch's dtype, for the compile
    programs = resident_programs(_encode_kernel, args(dummy, 0, full), {**consts, "MASKED": False}, max(full, 1))
    scratch = torch.empty(programs * (cap + kp), dtype=torch.int64, device=xf.device)
    if full:
        _encode_kernel[(programs,)](*args(scratch, 0, full), MASKED=False, **consts)
    if full < nc:
        _encode_kernel[(1,)](*args(scratch, full, nc), MASKED=True, **consts)
    raise_for_flag(int(flag.item()), "topk")  # the one host sync: errors surface here, not a step later
    return out


def _encode_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    out: torch.Tensor,
    *,
    chunk: int,
    k: int,
    bits: int,
) -> torch.Tensor:
    """`encode` through the PyTorch reference, for chunks above MAX_KERNEL_CHUNK.

    Raises the reference's ValueError on rejected input, `residual` untouched.
    """
    feedback = None if residual is None else ErrorFeedback(residual=residual)
    payload = TopKCodec(chunk=chunk, k=k, bits=bits).encode_reference(x, feedback)
    if feedback is not None:  # it holds a new tensor now; `residual` was only read
        (residual if residual_out is None else residual_out).copy_(feedback.residual)
    return out.copy_(payload)


def decode(
    payload: torch.Tensor,
    numel: int,
    *,
    chunk: int,
    k: int,
    bits: int,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Decode a topk payload of `numel` values: the selected entries, zeros elsewhere.

    Args:
        payload: contiguous 1-D uint8 tensor of `payload_nbytes(numel, ...)` bytes.
        numel: number of values encoded.
        chunk, k, bits: the parameters it was encoded with.
        out: optional contiguous fp32 tensor of `numel` elements on the payload's device.
        accumulate: add the decoded values into `out` instead of overwriting it (requires `out`).
            Only the k entries per chunk are touched; elsewhere `out` is left as it is, which
            equals `out += decoded` except that a -0.0 stays -0.0 (the dense add gives +0.0).

    Returns:
        `out`, or a new fp32 tensor of `numel` elements.

    Raises:
        ValueError: bad parameters, wrong payload size, `out` malformed, or `accumulate` without `out`.
    """
    nbytes = payload_nbytes(numel, chunk=chunk, k=k, bits=bits)
    check_payload(payload, nbytes, "topk")
    if out is None:
        if accumulate:
            raise ValueError("topk: accumulate=True needs out= (the tensor to add into)")
        out = torch.empty(numel, dtype=torch.float32, device=payload.device)
    of = flat_f32(out, "topk: out", payload.device)
    if of.numel() != numel:
        raise ValueError(f"topk: out has {of.numel()} elements, expected numel={numel}")
    if numel == 0:
        return out
    nc, ib, _, _ = _layout(numel, chunk, k, bits)
    scales, iwords, vwords = _views(payload, numel, chunk, k, bits)
    slots = min(triton.next_power_of_2(k), _DECODE_SLOTS)  # k need not be a power of two
    ztile = min(chunk, _ZERO_TILE)
    # Accumulating only scatters: many chunks per program. Overwriting also zeroes whole chunks.
    rows = _DECODE_SLOTS // slots if accumulate else _ZERO_TILE // ztile
    _decode_kernel[(triton.cdiv(nc, rows),)](
        scales, iwords, vwords, of, numel, nc,
        C=chunk, K=k, IB=ib, B=bits, ROWS=rows, SLOTS=slots, ZTILE=ztile, ACCUMULATE=accumulate,
        num_warps=8, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out
