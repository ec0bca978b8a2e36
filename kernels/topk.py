"""Chunked top-k encode with fused error feedback as a Triton kernel, bit-exact with docs/codecs.md.

The codec's kernels: `encode` here, `decode` in `topk_decoder`, the payload's layout and bit packing
in `topk_format` (`payload_nbytes` and `check_params` come from there), the search for the threshold
in `topk_select`.

Usage::

    from swarm.kernels import topk_encode, topk_decode

    # Error feedback fused in: acc = x + residual; payload = encode(acc); residual = acc - decode(payload)
    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2)      # residual updated in place
    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2, residual_out=new)  # one pass, see below
    y = topk_decode(payload, x.numel(), chunk=4096, k=64, bits=2)      # zeros except the selection

Encode is one kernel on a persistent grid (as many programs as the GPU runs at once, each walking
chunks pid, pid + grid, ...). A chunk (at most 4,096 values: 32 per thread, as rows of 4 consecutive
values) is loaded into registers while the program finishes the chunk before it. |acc| = |x + residual|
is handled as fp32 bit patterns (non-negative floats order like their bits as integers):

1. The chunk max (the scale, and the value check: NaN/Inf, or a decode that would overflow) and a
   lower bound `lo` on the threshold T, the k-th largest: the least of the second largest values
   of 32 disjoint sets (`topk_select.bounds`).
2. Candidates: the entries >= lo, about 190 of 4,096 for normal data and k = 64. While there are
   more than CAP (256, or 2k), a four-way search pass over the chunk raises lo: it counts at three
   thresholds in one reduction and keeps a quarter of [lo, hi]; about 7 % of normal chunks need it
   (`scripts/sweep_topk_kernel.py --bound-only`). The candidates of each sub-tile are counted too.
3. Re-read from cache in sub-tiles (fewer registers than keeping `acc` through step 4): every
   entry's residual is written as `acc` (what it is unless selected: unselected entries decode to 0),
   and the candidates go with their index (one int64 each: index << 32 | acc bits), in index order,
   to a per-program scratch of CAP entries (it stays in L2). Their places come from prefix counts
   over rows of 4 consecutive values (a thread's own, scanned in registers) plus one scan over the
   rows' totals, plus the sub-tile counts of step 2 (`_compact_above`, one flag per value). Only
   ties at T beyond CAP entries take the general pass (`_compact_ties`, two counts per value).
4. On the candidates only: the rest of the four-way search gives T, stopping as soon as exactly k
   entries are >= lo (about 4 steps for normal data instead of 12). Selected are the entries above T,
   plus the lowest-index entries equal to T up to k in all, and a prefix count over the candidates
   gives each its slot (ascending index order, no sort). They are quantized, their residual
   `acc - decode` overwrites step 3's (ordered by a barrier), and they go to a k-slot scratch from
   which each index and value word gathers its own fields (`topk_format.pack_chunk`).

If ties at T leave no threshold with at most CAP entries above it, step 2 runs to the exact T and
step 3 copies the k selected entries themselves (correct, slower).

The value check needs every chunk before any residual may change (a rejected call leaves the state
untouched). With `residual_out` the new residual goes to another tensor, so the check is the
encode pass itself and x and the residual are read from memory once. In place, a check kernel runs
first (one more read of both) and the encode kernel skips every chunk if it flagged.

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
from swarm.kernels.topk_decoder import decode
from swarm.kernels.topk_format import check_params, index_fields_per_word, layout, pack_chunk, payload_nbytes, views
from swarm.kernels.topk_select import bounds, count3, count3_small, magnitude_bits, quarters, search_step

__all__ = ["MAX_KERNEL_CHUNK", "check_params", "decode", "encode", "payload_nbytes"]

MAX_KERNEL_CHUNK = 4096
"""Largest chunk the encode kernel takes (32 values per thread in registers); larger chunks are
encoded by the PyTorch reference (see `encode`)."""
# Tuning constants, timed on an H200 at 2**30 values (sparseloco, every setting bit-exact with the
# reference; docs/benchmarks.md, 2026-12-04): candidate slots 256 against 512 took 4.75 against 5.06 ms;
# the whole chunk per compaction step (with `_encode_options`' 128 registers) 4.35 ms, against 4.46 for
# steps of 2,048 and 4.68 for 1,024 (96 registers). The bound's sets x rank (`topk_select.bounds`) and
# the rows of 4 (a thread's own values) are from the sweeps of 2026-12-03.
_MIN_CAP = 256  # candidates kept for the search on the candidates (at least 2k)
_SUB = 4096  # values per step of the compaction pass (reloaded from cache)
_MIN_SETS = 64  # sets x rank: the entries whose least bounds T from below, at least k of them
_SET_RANK = 2  # the bound is the least of the sets' _SET_RANK-th largest values (sets: _MIN_SETS / rank)
_ROW = 4  # > 0: the compaction pass scans rows of _ROW consecutive values, then the rows' totals


def _encode_options() -> dict[str, int]:
    """Launch options of the encode kernel: 4 warps, at most 128 registers per thread.

    The next chunk's x and residual wait in registers while a chunk finishes: at 128 registers
    (4 programs per SM) that took 4.35 ms at 2**30 values on an H200, against 4.88 ms at 112 and
    5.50 ms at 96 (spills), and 4.46 ms for the kernel without it at 96 (5 programs per SM).
    """
    return {"num_warps": 4, "maxnreg": 128}


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
def _load_chunk(ptr, chunk, offs, n, C: tl.constexpr, MASKED: tl.constexpr):
    """The fp32 values of chunk `chunk` (a scalar) at offsets `offs`; with MASKED, zeros past `n`."""
    base = chunk.to(tl.int64) * C
    if MASKED:
        return tl.load(ptr + base + offs, mask=offs < tl.minimum(n - base, C).to(tl.int32), other=0.0)
    return tl.load(ptr + base + offs)


@triton.jit
def _store_tile(ob, offs, v, rem, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ob + offs, v, mask=offs < rem)
    else:
        tl.store(ob + offs, v)


@triton.jit
def _quantize(acc, scale, L1: tl.constexpr):
    """(code, decoded value) of `acc` in a chunk of this scale, each step rounded as the reference's:
    c = clamp(rne(((v / scale + 1) * (L - 1)) / 2), 0, L - 1); decode ((2c - (L - 1)) * scale) / (L - 1)."""
    zero = scale == 0.0
    # `* 0.5` rounds exactly as `/ 2` (the same real quotient, one rounding), and costs no division.
    y = ((tl.math.div_rn(acc, tl.where(zero, 1.0, scale)) + 1.0) * L1) * 0.5
    code = tl.minimum(tl.maximum(_rne(y), 0.0), L1 * 1.0)
    code = tl.where(zero, 0.0, code).to(tl.int32)
    dec = tl.math.div_rn((2 * code - L1).to(tl.float32) * scale, L1 * 1.0)
    return code, dec


@triton.jit
def _exclusive_counts(f, ROW: tl.constexpr):
    """(exclusive prefix sums of the int32 tile `f` in index order, its total).

    With ROW > 0 the tile is [rows, ROW] of consecutive values: a scan within each row (a thread's
    own registers) plus one scan over the rows' totals.
    """
    if ROW > 0:
        row_tot = tl.sum(f, axis=1)
        before = (tl.cumsum(row_tot, 0) - row_tot)[:, None] + tl.cumsum(f, 1) - f
        tot = tl.sum(row_tot, axis=0)
    else:
        before = tl.cumsum(f, 0) - f
        tot = tl.sum(f, axis=0)
    return before, tot


@triton.jit
def _candidate(offs, acc):
    """A candidate as one int64: chunk index << 32 | acc bits."""
    return (offs.to(tl.int64) << 32) | (acc.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _tile_counts(u0, lo, C: tl.constexpr, SUB: tl.constexpr):
    """#(u0 >= lo) in each sub-tile of SUB values, in index order: a [C // SUB] vector."""
    return tl.sum(tl.reshape(tl.where(u0 >= lo, 1, 0), [C // SUB, SUB]), axis=1)


@triton.jit
def _compact_above(
    xb, rb, ob, cand, sub, rem, thr, cnt, C: tl.constexpr, SUB: tl.constexpr, ROW: tl.constexpr,
    HAS_RES: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Step 3 when every entry above `thr` is a candidate: the residual is `acc` everywhere, and
    those entries go to `cand` in index order.

    `cnt` holds how many there are in each sub-tile (from the registers of step 1), so the places of
    a sub-tile's candidates need no count of the sub-tiles before it; their sum is at most CAP, so no
    store is masked for room. |acc| is not clamped here as in `magnitude_bits`: thr < the Inf
    pattern, so a NaN compares above it either way, as it did in the counts.
    """
    tiles = tl.arange(0, C // SUB)
    for t in range(C // SUB):
        offs = t * SUB + sub
        acc = _tile_acc(xb, rb, offs, rem, HAS_RES, MASKED)
        if HAS_RES:
            _store_tile(ob, offs, acc, rem, MASKED)
        gt = ((acc.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > thr).to(tl.int32)
        before, _ = _exclusive_counts(gt, ROW)
        pos = tl.sum(tl.where(tiles < t, cnt, 0), axis=0) + before
        tl.store(cand + pos, _candidate(offs, acc), mask=gt != 0)


@triton.jit
def _compact_ties(
    xb, rb, ob, cand, sub, rem, thr, need, C: tl.constexpr, CAP: tl.constexpr, SUB: tl.constexpr,
    ROW: tl.constexpr, HAS_RES: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Step 3 in general: the entries above `thr` and the first `need` equal to it go to `cand` (at
    most CAP of them), the residual is `acc` everywhere. Returns how many went."""
    seen_gt = tl.full([], 0, tl.int32)
    seen_eq = tl.full([], 0, tl.int32)
    for t in range(C // SUB):
        offs = t * SUB + sub
        acc = _tile_acc(xb, rb, offs, rem, HAS_RES, MASKED)
        if HAS_RES:
            _store_tile(ob, offs, acc, rem, MASKED)
        u = magnitude_bits(acc)
        gt = (u > thr).to(tl.int32)
        eq = (u == thr).to(tl.int32)
        # One scan for both prefix counts: within a sub-tile each fits in 16 bits (SUB <= 8192).
        before, tot = _exclusive_counts(gt | (eq << 16), ROW)
        before_eq = seen_eq + (before >> 16)
        take = (gt != 0) | ((eq != 0) & (before_eq < need))
        pos = seen_gt + (before & 0xFFFF) + tl.minimum(before_eq, need)
        tl.store(cand + pos, _candidate(offs, acc), mask=take & (pos < CAP))
        seen_gt += tot & 0xFFFF
        seen_eq += tot >> 16
    return tl.minimum(seen_gt + tl.minimum(seen_eq, need), CAP)


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
    F: tl.constexpr,
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
    # The chunk as [C // 4, 4]: rows of 4 consecutive values (16-byte accesses); a thread holds rows t, t + 128, ...
    full = (tl.arange(0, C // 4) * 4)[:, None] + tl.max_contiguous(tl.arange(0, 4), 4)[None, :]
    if ROW > 0:  # sub-tiles as [SUB // ROW, ROW] rows of consecutive values: a row scan, then one over rows
        sub = (tl.arange(0, SUB // ROW) * ROW)[:, None] + tl.max_contiguous(tl.arange(0, ROW), ROW)[None, :]
    else:
        sub = tl.max_contiguous(tl.arange(0, SUB), 1)
    # One candidate per thread and access: the layout of their scattered stores in step 4 too.
    ci = tl.max_contiguous(tl.arange(0, CAP), 1)
    # This program's scratch (int64): CAP candidates (chunk index << 32 | acc bits), then the k slots.
    cand = scratch_ptr + pid.to(tl.int64) * (CAP + KP)
    slots = cand + CAP
    if CHECK:
        stop = tl.full([], 0, tl.int32)
    else:
        stop = tl.load(flag_ptr)

    # Software pipelining: each chunk's x and residual are loaded into registers while the chunk
    # before it finishes (step 4), so the loads' memory latency overlaps that work.
    xn = _load_chunk(x_ptr, c0 + pid, full, n, C, MASKED)
    rn = _load_chunk(r_ptr, c0 + pid, full, n, C, MASKED) if HAS_RES else xn
    for i in range(c0 + pid, c1, tl.num_programs(0)):
        if stop == 0:  # (a check kernel that flagged the input leaves every chunk untouched)
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
            u0 = magnitude_bits(xn + rn if HAS_RES else xn)  # in registers through step 2

            # 1. Scale and bounds of T: T <= max, and T >= lo.
            umax, lo = bounds(u0, C, SETS, RANK)
            scale = umax.to(tl.float32, bitcast=True)
            if CHECK:  # NONFINITE (1): NaN/Inf; OVERFLOW (2): (L - 1) * max overflows, as the check kernel's
                bad = tl.where(umax >= 0x7F800000, 1, tl.where(_not_finite(scale * L1), 2, 0))
                tl.atomic_or(flag_ptr, bad, mask=bad > 0, sem="relaxed")

            # 2. Four-way search over the whole chunk until at most CAP entries are >= lo.
            hi = umax
            cnt = _tile_counts(u0, lo, C, SUB)
            c_lo = tl.sum(cnt, axis=0)
            above = tl.full([], 0, tl.int32)
            bound = lo
            while (lo < hi) & (c_lo > CAP):
                t1, t2, t3 = quarters(lo, hi)
                n1, n2, n3 = count3(u0, t1, t2, t3, C)  # not c1: that is the chunk bound argument
                lo, hi, above, c_lo = search_step(lo, hi, above, c_lo, n1, n2, n3, t1, t2, t3, K)
            if lo != bound:
                cnt = _tile_counts(u0, lo, C, SUB)

            # 3. Residual `acc` everywhere (step 4 overwrites the k selected, after barriers: ordered),
            # candidates to the scratch in index order: the entries >= lo; or, if ties kept more than
            # CAP there, the k selected entries themselves: above T = lo, and the first `need` equal to it.
            if c_lo <= CAP:
                _compact_above(xb, rb, ob, cand, sub, rem, lo - 1, cnt, C, SUB, ROW, HAS_RES, MASKED)
                m = c_lo
            else:
                m = _compact_ties(xb, rb, ob, cand, sub, rem, lo, K - above, C, CAP, SUB, ROW, HAS_RES, MASKED)
            tl.debug_barrier()  # the scratch written above is read back by other threads
            # The next chunk's loads, in flight while this one finishes (the last chunk loads itself again).
            nxt = tl.minimum(i + tl.num_programs(0), c1 - 1)
            xn = _load_chunk(x_ptr, nxt, full, n, C, MASKED)
            if HAS_RES:
                rn = _load_chunk(r_ptr, nxt, full, n, C, MASKED)

            # 4. On the candidates: T exactly, the selection and its slots, quantize, residual, pack.
            cm = ci < m
            packed_c = tl.load(cand + ci, mask=cm, other=0)
            acc_c = packed_c.to(tl.int32).to(tl.float32, bitcast=True)  # the low word
            idx_c = (packed_c >> 32).to(tl.int32)
            u_c = tl.where(cm, magnitude_bits(acc_c), -1)  # -1: below every threshold
            # The search stops early once exactly K entries are >= lo (about 4 steps for normal data
            # instead of 12): they are the selection, whatever the ties below lo.
            while (lo < hi) & (c_lo != K):
                t1, t2, t3 = quarters(lo, hi)
                if CAP < 1024:
                    n1, n2, n3 = count3_small(u_c, t1, t2, t3)
                else:
                    n1, n2, n3 = count3(u_c, t1, t2, t3, CAP)
                lo, hi, above, c_lo = search_step(lo, hi, above, c_lo, n1, n2, n3, t1, t2, t3, K)
            # Selected: the entries above thr and the `need` lowest-index ones equal to it. Either
            # #(|acc| >= lo) = K (thr = lo - 1, need = 0), or lo = hi = T and #(|acc| > T) = above < K.
            exact = c_lo == K
            thr = tl.where(exact, lo - 1, lo)
            need = tl.where(exact, 0, K - above)
            gt = (u_c > thr).to(tl.int32)
            eq = (u_c == thr).to(tl.int32)
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
            tl.store(scale_ptr + chunk, scale)
            tl.debug_barrier()  # the slots written above are read back by other threads
            pack_chunk(slots, iw_ptr + chunk * (K * IB // 32), vw_ptr + chunk * (K * B // 32), K, IB, B, F)


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
    nc, ib, _, _ = layout(n, chunk, k, bits)
    scales, iwords, vwords = views(out, n, chunk, k, bits)
    flag = torch.zeros(1, dtype=torch.int32, device=xf.device)
    fused = rout is not rf or rf is None  # the state being replaced is not overwritten: check in the pass
    if not fused:
        check_async(xf, rf, flag, (1 << bits) - 1)
    kp = triton.next_power_of_2(k)
    cap = _capacity(chunk, k)
    sets = max(kp, _MIN_SETS) // _SET_RANK
    consts = {
        "C": chunk, "K": k, "KP": kp, "CAP": cap, "IB": ib, "B": bits, "F": index_fields_per_word(ib),
        "SUB": min(chunk, _SUB),
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
    unmasked = {**consts, "MASKED": False}
    programs = resident_programs(_encode_kernel, args(dummy, 0, full), unmasked, max(full, 1))
    scratch = torch.empty(programs * (cap + kp), dtype=torch.int64, device=xf.device)
    if full:
        _encode_kernel[(programs,)](*args(scratch, 0, full), **unmasked)
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
