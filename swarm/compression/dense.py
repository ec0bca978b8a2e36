"""Dense codecs: raw fp32 (`none`), bf16 / fp16 casts and blockwise-absmax `int8` (docs/codecs.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from swarm.compression.base import Codec, as_dtype, true_div


@dataclass(frozen=True)
class _CastCodec(Codec):
    """Every element stored as `dtype`, rounded to nearest-even; decode widens back to fp32."""

    dtype: ClassVar[torch.dtype]

    def payload_nbytes(self, numel: int) -> int:
        """Returns `numel * itemsize` (4 for none, 2 for bf16/fp16)."""
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def _overflows(self, absmax: torch.Tensor) -> torch.Tensor:
        # fp16 tops out at 65504 and bf16 just below fp32's max: rounding a larger finite value gives Inf.
        return torch.isinf(absmax.to(self.dtype))

    def _encode(self, x: torch.Tensor, payload: torch.Tensor) -> None:
        # copy_ converts with round-to-nearest-even, as Tensor.to does, on CPU and CUDA.
        as_dtype(payload, self.dtype).copy_(x)

    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        out.copy_(as_dtype(payload, self.dtype))


@dataclass(frozen=True)
class Float32Codec(_CastCodec):
    """`none`: the raw fp32 values (4n bytes); a copy, so the payload never aliases the input, unless `alias`."""

    name: ClassVar[str] = "none"
    family: ClassVar[str] = "none"
    dtype: ClassVar[torch.dtype] = torch.float32
    stores_values: ClassVar[bool] = True


@dataclass(frozen=True)
class BFloat16Codec(_CastCodec):
    """`bf16`: values rounded to nearest-even into bfloat16 (2n bytes)."""

    name: ClassVar[str] = "bf16"
    family: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16


@dataclass(frozen=True)
class Float16Codec(_CastCodec):
    """`fp16`: values rounded to nearest-even into float16 (2n bytes); |x| >= 65520 is rejected."""

    name: ClassVar[str] = "fp16"
    family: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16


INT8_BLOCK = 256
"""Elements per int8 scale block (docs/codecs.md)."""


@dataclass(frozen=True)
class Int8Codec(Codec):
    """`int8`: per block of 256, `scale = max|x| / 127`, codes `round_half_even(x / scale)`.

    Layout: `[scale: float32 x nb][code: int8 x n]`, `nb = ceil(n / 256)`, payload `4*nb + n` bytes.
    """

    name: ClassVar[str] = "int8"
    family: ClassVar[str] = "int8"

    @property
    def block(self) -> int:
        """Blocks of INT8_BLOCK elements share one scale."""
        return INT8_BLOCK

    def payload_nbytes(self, numel: int) -> int:
        """Returns `4 * ceil(numel / 256) + numel`."""
        return 4 * _ceil_div(numel, INT8_BLOCK) + numel

    def _overflows(self, absmax: torch.Tensor) -> torch.Tensor:
        # Decoding the extreme code 127 multiplies back by the rounded scale; only inputs within a few
        # ulps of fp32's max can overflow, but they must not come back as Inf.
        return torch.isinf(true_div(absmax, 127.0) * 127.0)

    def _encode(self, x: torch.Tensor, payload: torch.Tensor) -> None:
        n = x.numel()
        nb = _ceil_div(n, INT8_BLOCK)
        full = n // INT8_BLOCK
        scale = as_dtype(payload[: 4 * nb], torch.float32)
        code = payload[4 * nb :].view(torch.int8)
        # Whole blocks straight from x; the short last block on its own (no padded copy of x).
        _int8_blocks(x[: full * INT8_BLOCK].view(full, INT8_BLOCK), scale[:full], code[: full * INT8_BLOCK])
        if full < nb:
            _int8_blocks(x[full * INT8_BLOCK :].view(1, -1), scale[full:], code[full * INT8_BLOCK :])

    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        nb = _ceil_div(numel, INT8_BLOCK)
        full = numel // INT8_BLOCK
        scale = as_dtype(payload[: 4 * nb], torch.float32).unsqueeze(1)
        code = payload[4 * nb :].view(torch.int8)
        # int8 * fp32 promotes to fp32: code (exact in fp32) times its block's scale, written in place.
        cut = full * INT8_BLOCK
        torch.mul(code[:cut].view(full, INT8_BLOCK), scale[:full], out=out[:cut].view(full, INT8_BLOCK))
        if full < nb:
            torch.mul(code[cut:].view(1, -1), scale[full:], out=out[cut:].view(1, -1))


def _int8_blocks(blocks: torch.Tensor, scale_out: torch.Tensor, code_out: torch.Tensor) -> None:
    """Quantize rows of `blocks` (one int8 block each) into their scales and codes."""
    if blocks.numel() == 0:
        return
    lo, hi = torch.aminmax(blocks, dim=1)
    # abs_ turns the -0.0 that maximum(-lo, hi) gives for a block of -0.0s into the spec's +0.0.
    scale = true_div(torch.maximum(-lo, hi).abs_(), 127.0)  # true fp32 division, as the spec requires
    # A true division by the scale (not a multiply by its reciprocal): the spec fixes the rounding.
    # Where the scale is 0 (an all-zero block, or max|x| so small that max|x| / 127 underflows)
    # dividing by 1 instead leaves |q| < 0.5, so the code is 0 as the spec requires.
    q = blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(1)
    q.round_().clamp_(-127, 127)  # round() rounds half to even
    scale_out.copy_(scale)
    code_out.copy_(q.view(-1))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
