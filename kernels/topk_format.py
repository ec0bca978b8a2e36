"""The topk payload of docs/codecs.md for the kernels: its parameters, layout and bit packing.

Payload: ``[scale: f32 x nc][index words: u32 x nc*k*ib/32][value words: u32 x nc*k*b/32]`` for
``nc = ceil(n / chunk)`` chunks, ``ib = log2(chunk)`` index bits and ``b`` value bits. Within a chunk,
slot j's index takes bits [j*ib, (j+1)*ib) of the chunk's index-word stream (stream bit t is bit
t % 32 of word t // 32; a field may straddle two words), and its value code bits [j*b, (j+1)*b) of
the value-word stream (b divides 32: no straddling).

`pack_chunk` writes one chunk's words (the encode kernel), `slot_fields` reads slots back (the
decode kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_params(chunk: int, k: int, bits: int) -> None:
    """Raise ValueError unless (chunk, k, bits) is a topk configuration of docs/codecs.md."""
    if not (256 <= chunk <= 65536 and chunk & (chunk - 1) == 0):
        raise ValueError(f"topk: chunk must be a power of two in 256..65536, got {chunk}")
    if not (0 < k <= chunk and k % 32 == 0):
        raise ValueError(f"topk: k must be a positive multiple of 32 and <= chunk={chunk}, got {k}")
    if bits not in (2, 4, 8):
        raise ValueError(f"topk: bits must be 2, 4 or 8, got {bits}")


def layout(n: int, chunk: int, k: int, bits: int) -> tuple[int, int, int, int]:
    """(chunks, index bits, index words per chunk, value words per chunk) of `n` values."""
    ib = chunk.bit_length() - 1
    return triton.cdiv(n, chunk), ib, k * ib // 32, k * bits // 32


def payload_nbytes(n: int, *, chunk: int, k: int, bits: int) -> int:
    """Bytes of the topk payload of `n` values for these parameters."""
    check_params(chunk, k, bits)
    nc, _, iwords, vwords = layout(n, chunk, k, bits)
    return 4 * nc * (1 + iwords + vwords)


def views(payload: torch.Tensor, n: int, chunk: int, k: int, bits: int) -> tuple[torch.Tensor, ...]:
    """(scales as fp32, index words as int32, value words as int32): views of the payload's sections."""
    nc, _, iwords, _ = layout(n, chunk, k, bits)
    a, b = 4 * nc, 4 * nc * (1 + iwords)
    return payload[:a].view(torch.float32), payload[a:b].view(torch.int32), payload[b:].view(torch.int32)


def index_fields_per_word(ib: int) -> int:
    """Slots whose index bits can meet one 32-bit word (straddling ones included), a power of two."""
    return triton.next_power_of_2(31 // ib + 2)


@triton.jit
def pack_chunk(slot_ptr, iw_ptr, vw_ptr, K: tl.constexpr, IB: tl.constexpr, B: tl.constexpr, F: tl.constexpr):
    """Index and value words of one chunk from its k slots (`idx | code << 16`, in slot order).

    Each word gathers its own fields from the slots (at most F index fields, 32 / B value fields), so
    the words are built in registers without a reduction across the chunk.
    """
    # Index words: word w holds slots s = 32w // IB + f whose bits [s*IB, s*IB + IB) meet [32w, 32w + 32);
    # the first may start in the word before (off < 0: its high part), the last may run into the next.
    NIW: tl.constexpr = K * IB // 32
    w = tl.arange(0, triton.next_power_of_2(NIW))[:, None]
    s = (w * 32) // IB + tl.arange(0, F)[None, :]
    off = s * IB - w * 32
    ok = (w < NIW) & (s < K) & (off < 32)
    idx = (tl.load(slot_ptr + s, mask=ok, other=0) & 0xFFFF).to(tl.uint32)
    # (shift counts kept in 0..31 also where `ok` is false: a shift by 32 or more is undefined)
    left = tl.minimum(tl.maximum(off, 0), 31).to(tl.uint32)
    part = tl.where(off >= 0, idx << left, idx >> tl.minimum(tl.maximum(-off, 0), 31).to(tl.uint32))
    word = tl.sum(tl.where(ok, part, 0), axis=1)  # disjoint bits: the sum is their OR
    wi = tl.arange(0, triton.next_power_of_2(NIW))
    tl.store(iw_ptr + wi, word.to(tl.int32, bitcast=True), mask=wi < NIW)

    # Value words: B divides 32, so 32 / B consecutive slots fill one word exactly.
    PER: tl.constexpr = 32 // B
    NVW: tl.constexpr = K // PER
    v = tl.arange(0, triton.next_power_of_2(NVW))[:, None]
    j = tl.arange(0, PER)[None, :]
    sv = v * PER + j
    code = (tl.load(slot_ptr + sv, mask=(v < NVW) & (sv < K), other=0) >> 16).to(tl.uint32)
    vword = tl.sum(code << (j * B).to(tl.uint32), axis=1)
    vi = tl.arange(0, triton.next_power_of_2(NVW))
    tl.store(vw_ptr + vi, vword.to(tl.int32, bitcast=True), mask=vi < NVW)


@triton.jit
def slot_fields(iw_ptr, vw_ptr, slots, m, C: tl.constexpr, IB: tl.constexpr, B: tl.constexpr):
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
