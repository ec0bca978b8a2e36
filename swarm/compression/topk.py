"""Chunked top-k with chunk-local bit-packed indices and low-bit values (`topk`, `sparseloco`).

Layout (docs/codecs.md): `[scale: f32 x nc][index words: u32 x nc*k*ib/32][value words: u32 x nc*k*b/32]`
with `nc = ceil(n / C)` chunks and `ib = log2(C)` index bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from swarm.compression.base import Codec, _check_members, as_dtype, true_div

VALUE_BITS = (2, 4, 8)
"""Allowed value-code widths `b`."""
MIN_CHUNK, MAX_CHUNK = 256, 65536
"""Allowed chunk sizes `C` (powers of two)."""

SPARSELOCO = {"chunk": 4096, "k": 64, "bits": 2}
"""The sparseloco preset's topk parameters (it also turns error feedback on)."""


def check_topk_params(chunk: int, k: int, bits: int, prefix: str = "") -> None:
    """Raise ValueError, naming `prefix + option`, unless (chunk, k, bits) is a valid topk format."""
    if not isinstance(chunk, int) or not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
        raise ValueError(f"{prefix}chunk must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk!r}")
    if not isinstance(k, int) or k <= 0 or k % 32 or k > chunk:
        raise ValueError(f"{prefix}k must be a positive multiple of 32 and at most chunk ({chunk}), got {k!r}")
    if bits not in VALUE_BITS:
        raise ValueError(f"{prefix}bits must be one of {VALUE_BITS}, got {bits!r}")


@dataclass(frozen=True)
class TopKCodec(Codec):
    """Per chunk of `chunk` elements, the `k` largest |x| (ties to the lower index) with `bits`-bit values."""

    chunk: int = SPARSELOCO["chunk"]
    """Chunk size C, a power of two in [256, 65536]."""
    k: int = SPARSELOCO["k"]
    """Entries kept per chunk; a multiple of 32, at most chunk."""
    bits: int = SPARSELOCO["bits"]
    """Value-code width b: 2, 4 or 8."""
    error_feedback: bool = False
    """Whether peers should keep an ErrorFeedback for this codec (sparseloco: on)."""
    name: Literal["topk", "sparseloco"] = "topk"
    """The config name it was built from."""
    zero_level: bool = False
    """Value codes on 2^b - 1 levels that include an exact zero (result codecs): slots a chunk
    cannot fill with non-zeros then decode to 0 instead of to the smallest level."""

    family = "topk"

    def __post_init__(self) -> None:
        check_topk_params(self.chunk, self.k, self.bits, prefix="TopKCodec.")

    @classmethod
    def sparseloco(cls) -> TopKCodec:
        """Returns the sparseloco preset: C=4096, k=64, b=2, error feedback on."""
        return cls(**SPARSELOCO, error_feedback=True, name="sparseloco")

    @property
    def uses_error_feedback(self) -> bool:
        """Whether peers should keep an ErrorFeedback for this codec."""
        return self.error_feedback

    @property
    def block(self) -> int:
        """Each chunk is selected and scaled on its own."""
        return self.chunk

    @property
    def index_bits(self) -> int:
        """`ib = log2(chunk)`, the width of one packed index."""
        return self.chunk.bit_length() - 1

    def payload_nbytes(self, numel: int) -> int:
        """Returns `nc * (4 + k*ib/8 + k*b/8)` with `nc = ceil(numel / chunk)`."""
        nc = -(-numel // self.chunk)
        return nc * (4 + self.k * self.index_bits // 8 + self.k * self.bits // 8)

    def result_codec(self, members: int) -> TopKCodec:
        """Returns `topk(C, min(C, members*k), 8)` without error feedback: every entry of the union of
        the members' selections fits, with 8-bit values (docs/codecs.md, "In the all-reduce")."""
        _check_members(members)
        return TopKCodec(chunk=self.chunk, k=min(self.chunk, members * self.k), bits=8, zero_level=True)

    # ------------------------------------------------------------------ numerics

    def _overflows(self, absmax: torch.Tensor) -> torch.Tensor:
        # Decode multiplies (2c - (L-1)), up to L-1 in magnitude, by the scale before dividing by
        # L-1: a chunk max above about FLT_MAX / (L-1) would decode to Inf.
        levels = float(self._half_levels if self.zero_level else (1 << self.bits) - 1)
        return torch.isinf(true_div(absmax * levels, levels))

    @property
    def _half_levels(self) -> int:
        """H = 2^(b-1) - 1: zero-level codes span -H..H around the code H."""
        return (1 << (self.bits - 1)) - 1

    def _encode(self, x: torch.Tensor, payload: torch.Tensor) -> None:
        n, chunk, k = x.numel(), self.chunk, self.k
        nc = -(-n // chunk)
        ib = self.index_bits
        levels = (1 << self.bits) - 1  # L - 1
        xc = x if n == nc * chunk else torch.nn.functional.pad(x, (0, nc * chunk - n))
        xc = xc.view(nc, chunk)
        mag = xc.abs()
        # Selection key: |x| ordered by its fp32 bit pattern (monotone for non-negative floats), then
        # the lower index first. Keys are unique, so topk's choice is fully determined on any device.
        order = torch.arange(chunk - 1, -1, -1, dtype=torch.int64, device=x.device)
        key = mag.view(torch.int32).to(torch.int64).bitwise_left_shift_(ib).bitwise_or_(order)
        idx = key.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # slots in ascending index order
        scale = mag.amax(dim=1)
        values = xc.gather(1, idx)
        nonzero = (scale > 0).unsqueeze(1)
        safe = torch.where(nonzero, scale.unsqueeze(1), 1.0)
        if self.zero_level:
            # c = clamp(round_half_even((v / scale) * H), -H, H) + H; zero maps to the code H exactly.
            h = self._half_levels
            t = torch.round((values / safe) * float(h)).clamp_(-h, h) + h
            code = torch.where(nonzero, t, float(h)).to(torch.int64)
        else:
            # Evaluated left to right in fp32, exactly as written in the spec: ((v / scale + 1) * (L-1)) / 2.
            t = true_div((values / safe + 1.0) * float(levels), 2.0)
            code = torch.where(nonzero, torch.round(t).clamp_(0, levels), 0.0).to(torch.int64)

        index_words = nc * k * ib // 32
        as_dtype(payload[: 4 * nc], torch.float32).copy_(scale)
        as_dtype(payload[4 * nc : 4 * (nc + index_words)], torch.int32).copy_(_pack(idx.view(-1), ib))
        as_dtype(payload[4 * (nc + index_words) :], torch.int32).copy_(_pack(code.view(-1), self.bits))

    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        chunk, k = self.chunk, self.k
        nc = -(-numel // chunk)
        ib = self.index_bits
        levels = (1 << self.bits) - 1
        index_words = nc * k * ib // 32
        scale = as_dtype(payload[: 4 * nc], torch.float32)
        idx = _unpack(as_dtype(payload[4 * nc : 4 * (nc + index_words)], torch.int32), ib, nc * k).view(nc, k)
        code = _unpack(as_dtype(payload[4 * (nc + index_words) :], torch.int32), self.bits, nc * k).view(nc, k)
        if self.zero_level:
            h = self._half_levels  # ((c - H) as fp32 * scale) / H as fp32
            values = true_div((code - h).to(torch.float32) * scale.unsqueeze(1), float(h))
        else:
            # ((2c - (L-1)) as fp32 * scale) / (L-1) as fp32, as the spec writes it.
            values = true_div((2 * code - levels).to(torch.float32) * scale.unsqueeze(1), float(levels))
        pos = idx + torch.arange(nc, dtype=torch.int64, device=payload.device).unsqueeze(1) * chunk
        out.zero_()
        if numel == nc * chunk:
            out[pos.view(-1)] = values.view(-1)
        else:
            keep = pos < numel  # slots in the zero padding of the last chunk are dropped
            out[pos[keep]] = values[keep]


def _pack(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-pack non-negative int64 `fields` (each < 2**width) into int32 words, little-endian stream.

    Field j occupies bits [j*width, (j+1)*width) of the stream; stream bit t is bit t % 32 of word
    t // 32. len(fields) * width must be a multiple of 32. A field may straddle two words, so each
    contributes a low part to its word and a high part to the next; the parts never overlap, so a
    scatter-add is a bitwise or (and integer adds keep it deterministic on CUDA).
    """
    m = fields.numel()
    nwords = m * width // 32
    pos = torch.arange(m, dtype=torch.int64, device=fields.device) * width
    word, shift = pos >> 5, pos & 31
    words = torch.zeros(nwords + 1, dtype=torch.int64, device=fields.device)
    words.scatter_add_(0, word, (fields << shift) & 0xFFFFFFFF)
    words.scatter_add_(0, word + 1, fields >> (32 - shift))  # 0 unless the field straddles
    words = words[:nwords]
    # Reinterpret as int32 two's complement without relying on a wrapping int64 -> int32 cast.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack(words: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `_pack`: `count` int64 fields of `width` bits from int32 words."""
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)])
    pos = torch.arange(count, dtype=torch.int64, device=words.device) * width
    word, shift = pos >> 5, pos & 31
    # The next word's bits land at or above bit 32 - shift >= width when the field does not straddle,
    # so the mask drops them.
    return ((w[word] >> shift) | (w[word + 1] << (32 - shift))) & ((1 << width) - 1)
