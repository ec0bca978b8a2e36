"""Dense codecs: raw fp32 (`none`), bf16 / fp16 casts and blockwise-absmax `int8` (docs/codecs.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from swarm.compression.base import Codec, as_dtype


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
    """`none`: the raw fp32 values (4n bytes), a copy so the payload never aliases the input."""

    name: ClassVar[str] = "none"
    family: ClassVar[str] = "none"
    dtype: ClassVar[torch.dtype] = torch.float32


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

    def payload_nbytes(self, numel: int) -> int:
        """Returns `4 * ceil(numel / 256) + numel`."""
        return 4 * _ceil_div(numel, INT8_BLOCK) + numel

    def _overflows(self, absmax: torch.Tensor) -> torch.Tensor:
        # Decoding the extreme code 127 multiplies back by the rounded scale; only inputs within a few
        # ulps of fp32's max can overflow, but they must not come back as Inf.
        return torch.isinf((absmax / 127.0) * 127.0)

    def _encode(self, x: torch.Tensor, payload: torch.Tensor) -> None:
        n = x.numel()
        nb = _ceil_div(n, INT8_BLOCK)
        blocks = _pad_to(x, nb * INT8_BLOCK).view(nb, INT8_BLOCK)  # zero padding leaves max|x| unchanged
        scale = blocks.abs().amax(dim=1) / 127.0  # true fp32 division, as the spec requires
        nonzero = scale > 0
        # A true division by the scale (not a multiply by its reciprocal): the spec fixes the rounding.
        q = blocks / torch.where(nonzero, scale, 1.0).unsqueeze(1)
        code = torch.round(q).clamp_(-127, 127)  # torch.round rounds half to even
        code = torch.where(nonzero.unsqueeze(1), code, 0.0)
        as_dtype(payload[: 4 * nb], torch.float32).copy_(scale)
        payload[4 * nb :].view(torch.int8).copy_(code.view(-1)[:n])

    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        nb = _ceil_div(numel, INT8_BLOCK)
        scale = as_dtype(payload[: 4 * nb], torch.float32)
        code = _pad_to(payload[4 * nb :].view(torch.int8).float(), nb * INT8_BLOCK).view(nb, INT8_BLOCK)
        out.copy_((code * scale.unsqueeze(1)).view(-1)[:numel])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` followed by zeros up to `size` elements (x itself when already that long)."""
    if x.numel() == size:
        return x
    return torch.nn.functional.pad(x, (0, size - x.numel()))
