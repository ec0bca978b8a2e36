"""Chunked top-k codec with fused error feedback as Triton kernels, bit-exact with docs/codecs.md.

Payload: ``[scale: f32 x nc][index words: u32 x nc*k*ib/32][value words: u32 x nc*k*b/32]`` for
``nc = ceil(n / chunk)`` chunks, ``ib = log2(chunk)`` index bits and ``b`` value bits.

Usage::

    from swarm.kernels import topk_encode, topk_decode

    # Error feedback fused in: acc = x + residual; payload = encode(acc); residual = acc - decode(payload)
    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2)      # residual updated in place
    y = topk_decode(payload, x.numel(), chunk=4096, k=64, bits=2)      # zeros except the selection
    topk_decode(payload, n, chunk=4096, k=64, bits=2, out=acc, accumulate=True)   # acc += decoded

Encode runs three kernels on the stream:

1. Check: `x + residual` everywhere, for NaN/Inf and for values whose decode would overflow. It sets
   a flag that the next two read before storing anything, so a rejected call leaves the residual
   untouched; the launcher then raises. (One extra read of x and the residual, and one host sync.)
2. Select, one program per chunk: the threshold T, the k-th largest |acc|, is found by a
   four-way search over the fp32 bit patterns of |acc| (non-negative floats order like their bits
   as integers), between the chunk max and the smallest of k group maxima: each pass counts at
   three thresholds in one reduction (16-bit fields of an int64) and keeps a quarter of the range,
   so about half the passes of a binary search; the count above T falls out of the search.
   Selected: entries above T, plus the lowest-index entries equal to T up to k in all. A prefix
   count (`tl.cumsum`) in index order, over sub-tiles of 1,024 reloaded from cache (fewer
   registers), gives each its slot, so slots come out in ascending index order without a sort;
   the indices go to a scratch array in slot order. Entries not selected get their residual
   (`acc`: they decode to 0).
3. Pack, several chunks per program, on the k selected entries only: quantize, write their
   residual, and build the index and value words in registers (plain stores, no atomics).

Chunks of up to 8,192 values stay in registers through the select passes; larger chunks are walked
in tiles of 8,192, reloaded per pass (correct, but slower).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from swarm.kernels._common import LAUNCH_OPTIONS, _rne, check_async, check_payload, flat_f32, raise_for_flag

_MAX_TILE = 8192  # largest chunk kept in registers (32 values per thread at 8 warps)
_SUB = 1024  # entries per step of the select kernel's final (prefix-scan) pass
_PACK_SLOTS = 256  # (chunk, slot) pairs quantized and packed per program
_DECODE_SLOTS = 2048  # (chunk, slot) pairs decoded per program


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


def _select_warps(tile: int) -> int:
    return 4 if tile <= 4096 else 8


@triton.jit
def _load_acc(x_ptr, r_ptr, offs, n, HAS_RES: tl.constexpr):
    """acc = x + residual over `offs`, zeros past `n` (the spec's padding)."""
    m = offs < n
    acc = tl.load(x_ptr + offs, mask=m, other=0.0)
    if HAS_RES:
        acc = acc + tl.load(r_ptr + offs, mask=m, other=0.0)
    return acc


@triton.jit
def _magnitude_bits(acc):
    """Bit pattern of |acc| as int32: for finite fp32 it orders exactly as |acc| does.

    NaN patterns (GPUs produce 0x7FFFFFFF) are clamped to Inf's, so the search below never sees a
    range wide enough to overflow int32; such input is rejected anyway.
    """
    return tl.minimum(acc.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800000)


@triton.jit
def _count3(u, t1, t2, t3):
    """Per-chunk counts of u >= t1, t2, t3 (t1 <= t2 <= t3) in one reduction: an int64 of 16-bit
    fields at bits 0, 16 and 32 (a chunk's counts are at most 8,192)."""
    a = (tl.where(u >= t1, 1, 0) + tl.where(u >= t2, 65536, 0)).to(tl.int64)
    s = tl.sum(a + tl.where(u >= t3, 0x100000000, 0).to(tl.int64), axis=0)
    return (s & 0xFFFF).to(tl.int32), ((s >> 16) & 0xFFFF).to(tl.int32), (s >> 32).to(tl.int32)


@triton.jit
def _select_kernel(
    x_ptr,
    r_ptr,
    scale_ptr,
    sel_ptr,
    flag_ptr,
    n,
    C: tl.constexpr,
    K: tl.constexpr,
    TILE: tl.constexpr,
    SUB: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """One program per chunk: scale, the k selected indices in slot order (to `sel_ptr`), and the
    residual of the entries that are not selected (`acc`, since they decode to 0)."""
    NT: tl.constexpr = C // TILE
    chunk = tl.program_id(0).to(tl.int64)
    base = chunk * C
    lane = tl.arange(0, TILE)
    # Written by the check kernel queued before this one on the same stream: when set, nothing
    # below is stored (the residual stays as it was) and the launcher raises.
    flag = tl.load(flag_ptr)
    if NT == 1:  # only |acc|'s bits stay in registers through the search
        u0 = _magnitude_bits(_load_acc(x_ptr, r_ptr, base + lane, n, HAS_RES))

    # Bounds of the threshold T = the k-th largest |acc| bit pattern: T <= max, and, when the chunk
    # splits into k groups of GROUP consecutive entries, T >= the smallest group maximum (those k
    # maxima are k distinct entries). A narrower range means fewer search passes.
    umax = tl.full([], 0, tl.int32)
    lo = tl.full([], 0x7FFFFFFF if GROUP > 0 else 0, tl.int32)
    for t in range(NT):
        if NT == 1:
            u = u0
        else:
            u = _magnitude_bits(_load_acc(x_ptr, r_ptr, base + t * TILE + lane, n, HAS_RES))
        umax = tl.maximum(umax, tl.max(u, axis=0))
        if GROUP > 0:
            lo = tl.minimum(lo, tl.min(tl.max(tl.reshape(u, [TILE // GROUP, GROUP]), axis=1), axis=0))
    # Four-way search for the largest t with #(|acc| >= t) >= K: each pass counts at three
    # thresholds and keeps a quarter of [lo, hi] (none when the input was rejected). Invariants:
    # #(u >= lo) >= K, T in [lo, hi], above = #(u > hi) (< K).
    hi = tl.where(flag == 0, umax, lo)
    above = tl.full([], 0, tl.int32)
    while lo < hi:
        step = (hi - lo + 3) >> 2
        t1 = lo + step
        t2 = tl.minimum(t1 + step, hi)
        t3 = tl.minimum(t2 + step, hi)
        if NT == 1:
            c1, c2, c3 = _count3(u0, t1, t2, t3)
        else:
            c1 = tl.full([], 0, tl.int32)
            c2 = tl.full([], 0, tl.int32)
            c3 = tl.full([], 0, tl.int32)
            for t in range(NT):
                u = _magnitude_bits(_load_acc(x_ptr, r_ptr, base + t * TILE + lane, n, HAS_RES))
                d1, d2, d3 = _count3(u, t1, t2, t3)
                c1 += d1
                c2 += d2
                c3 += d3
        b3 = c3 >= K
        b2 = c2 >= K
        b1 = c1 >= K
        new_lo = tl.where(b3, t3, tl.where(b2, t2, tl.where(b1, t1, lo)))
        new_hi = tl.where(b3, hi, tl.where(b2, t3 - 1, tl.where(b1, t2 - 1, t1 - 1)))
        above = tl.where(b3, above, tl.where(b2, c3, tl.where(b1, c2, c1)))
        lo = new_lo
        hi = new_hi
    thr = lo
    # #(|acc| > T) = above < K <= #(|acc| >= T): take the `need` lowest-index entries equal to T.
    need = K - above

    # Final pass in sub-tiles of SUB (acc reloaded, from cache), which keeps the prefix scans small.
    sub = tl.arange(0, SUB)
    ok = (flag + tl.zeros([SUB], dtype=tl.int32)) == 0  # (the interpreter mis-broadcasts a bool scalar)
    seen_gt = tl.full([], 0, tl.int32)
    seen_eq = tl.full([], 0, tl.int32)
    for t in range(C // SUB):
        offs = base + t * SUB + sub
        acc = _load_acc(x_ptr, r_ptr, offs, n, HAS_RES)
        u = _magnitude_bits(acc)
        gt = (u > thr).to(tl.int32)
        eq = (u == thr).to(tl.int32)
        # One scan for both prefix counts: within a sub-tile each fits in 16 bits (SUB <= 8192).
        both = gt | (eq << 16)
        before = tl.cumsum(both, 0) - both
        before_gt = seen_gt + (before & 0xFFFF)
        before_eq = seen_eq + (before >> 16)
        sel = (gt != 0) | ((eq != 0) & (before_eq < need))
        slot = before_gt + tl.minimum(before_eq, need)
        # Slots are distinct, so these are plain stores; padding entries may be selected too.
        # (After a rejection the search was skipped and `sel` means nothing: store nothing.)
        tl.store(sel_ptr + chunk * K + slot, t * SUB + sub, mask=sel & ok)
        if HAS_RES:
            tl.store(r_ptr + offs, acc, mask=~sel & (offs < n) & ok)
        tot = tl.sum(both, axis=0)
        seen_gt += tot & 0xFFFF
        seen_eq += tot >> 16
    tl.store(scale_ptr + chunk, umax.to(tl.float32, bitcast=True), mask=flag == 0)


@triton.jit
def _pack_kernel(
    x_ptr,
    r_ptr,
    sel_ptr,
    scale_ptr,
    iw_ptr,
    vw_ptr,
    flag_ptr,
    n,
    nc,
    C: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    IB: tl.constexpr,
    B: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """ROWS chunks per program: quantize the selected entries, write their residual, pack the words.

    Runs after `_select_kernel` (same stream), which left the residual of selected entries as it
    was, so `acc = x + residual` is recomputed here exactly as there.
    """
    L1: tl.constexpr = (1 << B) - 1  # L - 1
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # chunk ids
    slots = tl.arange(0, KP)  # KP = K rounded up to a power of two
    flag = tl.load(flag_ptr)
    rmask = (rows < nc) & ((flag + tl.zeros([ROWS], dtype=tl.int32)) == 0)  # nothing at all after a rejection
    m2 = rmask[:, None] & (slots < K)[None, :]

    idx = tl.load(sel_ptr + rows[:, None] * K + slots[None, :], mask=m2, other=0)
    pos = rows[:, None] * C + idx
    inb = m2 & (pos < n)  # padding slots: acc 0, no residual
    acc = _load_acc(x_ptr, r_ptr, tl.where(inb, pos, n), n, HAS_RES)
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
    zero = scale == 0.0
    # c = clamp(rne(((v / scale + 1) * (L - 1)) / 2), 0, L - 1), each step rounded as the reference's.
    y = tl.math.div_rn((tl.math.div_rn(acc, tl.where(zero, 1.0, scale)) + 1.0) * L1, 2.0)
    code = tl.minimum(tl.maximum(_rne(y), 0.0), L1 * 1.0)
    code = tl.where(zero, 0.0, code).to(tl.int32)
    if HAS_RES:
        dec = tl.math.div_rn((2 * code - L1).to(tl.float32) * scale, L1 * 1.0)
        tl.store(r_ptr + pos, acc - dec, mask=inb)

    # Value words: B divides 32, so 32 / B consecutive slots fill one word exactly. The fields are
    # disjoint bits, so summing them is OR-ing them.
    PER: tl.constexpr = 32 // B
    fields = tl.reshape(code.to(tl.uint32), [ROWS, KP // PER, PER])
    vwords = tl.sum(fields << (tl.arange(0, PER) * B).to(tl.uint32)[None, None, :], axis=2)
    wid = tl.arange(0, KP // PER)
    wmask = rmask[:, None] & (wid < K // PER)[None, :]
    tl.store(vw_ptr + rows[:, None] * (K * B // 32) + wid[None, :], vwords.to(tl.int32, bitcast=True), mask=wmask)

    # Index words: every 32 slots fill IB words; a field may straddle two words.
    fields = tl.reshape(idx.to(tl.uint32), [ROWS, KP // 32, 32])
    bit = tl.arange(0, 32) * IB
    word_of = (bit >> 5)[None, None, :]
    shift = (bit & 31)[None, None, :]
    spill = shift + IB > 32
    grp = tl.arange(0, KP // 32)
    gmask = rmask[:, None] & (grp < K // 32)[None, :]
    for w in tl.static_range(IB):
        low = tl.where(word_of == w, fields << shift.to(tl.uint32), 0)
        high = tl.where(spill & (word_of + 1 == w), fields >> tl.where(spill, 32 - shift, 0).to(tl.uint32), 0)
        word = tl.sum(low | high, axis=2)
        tl.store(
            iw_ptr + rows[:, None] * (K * IB // 32) + grp[None, :] * IB + w, word.to(tl.int32, bitcast=True), mask=gmask
        )


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
    ACCUMULATE: tl.constexpr,
):
    L1: tl.constexpr = (1 << B) - 1
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # chunk ids
    slots = tl.program_id(1) * SLOTS + tl.arange(0, SLOTS)
    m2 = (rows < nc)[:, None] & (slots < K)[None, :]
    scale = tl.load(scale_ptr + rows, mask=rows < nc, other=0.0)

    ibit = slots * IB
    ish = ibit & 31
    iw = iw_ptr + rows[:, None] * (K * IB // 32) + (ibit >> 5)[None, :]
    idx = tl.load(iw, mask=m2, other=0).to(tl.uint32, bitcast=True) >> ish.to(tl.uint32)[None, :]
    if 32 % IB != 0:
        spill = (ish + IB > 32)[None, :]
        hi = tl.load(iw + 1, mask=m2 & spill, other=0).to(tl.uint32, bitcast=True)
        idx = idx | (hi << tl.where(spill, 32 - ish[None, :], 0).to(tl.uint32))
    idx = (idx & (C - 1)).to(tl.int64)

    vbit = slots * B
    vw = tl.load(vw_ptr + rows[:, None] * (K * B // 32) + (vbit >> 5)[None, :], mask=m2, other=0)
    code = ((vw.to(tl.uint32, bitcast=True) >> (vbit & 31).to(tl.uint32)[None, :]) & L1).to(tl.int32)
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
) -> torch.Tensor:
    """Encode `x + residual` into the topk payload and set `residual` to what the payload misses.

    Args:
        x: contiguous fp32 tensor (read flat) on the kernel's device.
        residual: error-feedback state, contiguous fp32 with `x.numel()` elements; updated in place
            to `acc - decode(payload)`. None encodes `x` alone.
        chunk: chunk size C, a power of two in 256..65536.
        k: entries kept per chunk, a multiple of 32, at most `chunk`.
        bits: value bits, 2, 4 or 8.
        out: optional uint8 tensor of `payload_nbytes(...)` bytes to write into.

    Returns:
        The payload (`out` when given).

    Raises:
        ValueError: `x + residual` holds NaN or Inf ("topk: input has NaN/Inf"), or values above
            about FLT_MAX / (2**bits - 1), whose decode would be Inf (the reference rejects those
            too); `residual` is then left untouched. Also for bad parameters or a malformed tensor.
    """
    check_params(chunk, k, bits)
    xf = flat_f32(x, "topk: x")
    n = xf.numel()
    rf = None
    if residual is not None:
        rf = flat_f32(residual, "topk: residual", xf.device)
        if rf.numel() != n:
            raise ValueError(f"topk: residual has {rf.numel()} elements but x has {n}")
    nbytes = payload_nbytes(n, chunk=chunk, k=k, bits=bits)
    if out is None:
        out = torch.zeros(nbytes, dtype=torch.uint8, device=xf.device)
    else:
        check_payload(out, nbytes, "topk", xf.device)
    if n == 0:
        return out
    nc, ib, _, _ = _layout(n, chunk, k, bits)
    scales, iwords, vwords = _views(out, n, chunk, k, bits)
    flag = torch.zeros(1, dtype=torch.int32, device=xf.device)
    check_async(xf, rf, flag, (1 << bits) - 1)
    r_arg = rf if rf is not None else xf
    selected = torch.empty(nc * k, dtype=torch.int32, device=xf.device)  # chunk-local indices, slot order
    tile = min(chunk, _MAX_TILE)
    group = chunk // k if chunk % k == 0 and chunk // k <= tile else 0
    _select_kernel[(nc,)](
        xf, r_arg, scales, selected, flag, n,
        C=chunk, K=k, TILE=tile, SUB=min(tile, _SUB), GROUP=group, HAS_RES=rf is not None,
        num_warps=_select_warps(tile), **LAUNCH_OPTIONS,
    )  # fmt: skip
    kp = triton.next_power_of_2(k)
    rows = max(1, _PACK_SLOTS // kp)
    _pack_kernel[(triton.cdiv(nc, rows),)](
        xf, r_arg, selected, scales, iwords, vwords, flag, n, nc,
        C=chunk, K=k, KP=kp, IB=ib, B=bits, ROWS=rows, HAS_RES=rf is not None,
        num_warps=4, **LAUNCH_OPTIONS,
    )  # fmt: skip
    raise_for_flag(int(flag.item()), "topk")  # the one host sync: errors surface here, not a step later
    return out


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
    if not accumulate:
        of.zero_()
    if numel == 0:
        return out
    nc, ib, _, _ = _layout(numel, chunk, k, bits)
    scales, iwords, vwords = _views(payload, numel, chunk, k, bits)
    slots = min(triton.next_power_of_2(k), _DECODE_SLOTS)  # k need not be a power of two
    rows = _DECODE_SLOTS // slots
    grid = (triton.cdiv(nc, rows), triton.cdiv(k, slots))
    _decode_kernel[grid](
        scales,
        iwords,
        vwords,
        of,
        numel,
        nc,
        C=chunk,
        K=k,
        IB=ib,
        B=bits,
        ROWS=rows,
        SLOTS=slots,
        ACCUMULATE=accumulate,
        num_warps=8,
        **LAUNCH_OPTIONS,
    )
    return out
