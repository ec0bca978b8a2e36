"""Blockwise int8 absmax codec (block 256) as Triton kernels, bit-exact with docs/codecs.md.

Payload: ``[scale: float32 x nb][code: int8 x n]`` with ``nb = ceil(n / 256)``.
``scale = max|x| / 127`` per block (true fp32 division), ``code = clamp(rne(x / scale), -127, 127)``
(0 where the scale is 0), decode ``code * scale``.

Usage::

    from swarm.kernels import int8_encode, int8_decode

    payload = int8_encode(x)                      # x: contiguous fp32 (CUDA, or CPU under TRITON_INTERPRET=1)
    y = int8_decode(payload, x.numel())           # fresh fp32 tensor
    int8_decode(payload, x.numel(), out=acc, accumulate=True)   # acc += decoded, as a reduction does

Each program handles a few blocks as a [rows, 256] tile: one row-wise max gives their scales, so
every element is read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swarm.kernels._common import LAUNCH_OPTIONS, _not_finite, _rne, check_payload, flat_f32, raise_for_flag

BLOCK = 256
"""Elements per scale (the spec's B)."""

# Blocks per program and warps, measured on an H200: the decode with 64M values (102 us); the encode
# at 2**30 values by scripts/sweep_int8_kernel.py (4 blocks on 1 warp, 16 values per thread: 1.32 ms
# against 1.35 for the earlier 4 on 2 warps, in the same call).
_ENCODE_ROWS, _ENCODE_WARPS = 4, 1
_DECODE_ROWS, _DECODE_WARPS = 4, 8


def payload_nbytes(n: int) -> int:
    """Bytes of the int8 payload of `n` values: 4 per block of 256 plus 1 per value."""
    return 4 * triton.cdiv(n, BLOCK) + n


@triton.jit
def _encode_kernel(x_ptr, scale_ptr, code_ptr, flag_ptr, n, nb, ROWS: tl.constexpr, B: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * B + tl.arange(0, B)[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)

    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    # NONFINITE (bit 0) for NaN/Inf; OVERFLOW (bit 1) where code 127 would decode to Inf, as the
    # reference's check `isinf((max|x| / 127) * 127)`.
    nonfinite = tl.max(tl.max(_not_finite(x).to(tl.int32), axis=1), axis=0)
    overflow = tl.max(_not_finite(scale * 127.0).to(tl.int32), axis=0)
    bits = nonfinite | (overflow << 1)
    tl.atomic_or(flag_ptr, bits, mask=bits > 0, sem="relaxed")
    tl.store(scale_ptr + rows, scale, mask=rows < nb)
    # A scale of 0 (all-zero block, or max|x| so small that /127 underflows) codes every value as 0;
    # divide by 1 there so no Inf/NaN is produced on the way.
    zero = (scale == 0.0)[:, None]
    safe = tl.where(zero, 1.0, scale[:, None])
    q = _rne(tl.math.div_rn(x, safe))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    q = tl.where(zero, 0.0, q)
    tl.store(code_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _decode_kernel(scale_ptr, code_ptr, out_ptr, n, nb, ROWS: tl.constexpr, B: tl.constexpr, ACCUMULATE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * B + tl.arange(0, B)[None, :]
    mask = offs < n
    scale = tl.load(scale_ptr + rows, mask=rows < nb, other=0.0)
    v = tl.load(code_ptr + offs, mask=mask, other=0).to(tl.float32) * scale[:, None]
    if ACCUMULATE:
        # Same single rounding as the reference's `out += decoded` (FMA contraction is off).
        v = tl.load(out_ptr + offs, mask=mask, other=0.0) + v
    tl.store(out_ptr + offs, v, mask=mask)


def _views(payload: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = triton.cdiv(n, BLOCK)
    return payload[: 4 * nb].view(torch.float32), payload[4 * nb :].view(torch.int8)


def encode(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Encode `x` into the int8 payload of docs/codecs.md.

    Args:
        x: contiguous fp32 tensor (any shape, read flat) on the kernel's device.
        out: optional uint8 tensor of `payload_nbytes(x.numel())` bytes to write into. On error its
            contents are unspecified (the kernel scans and writes in one pass).

    Returns:
        The payload (`out` when given).

    Raises:
        ValueError: `x` holds NaN or Inf ("int8: input has NaN/Inf") or values within a few ulps of
            fp32's max whose decode would be Inf (the reference rejects those too), or a tensor
            argument is malformed.
    """
    xf = flat_f32(x, "int8: x")
    n = xf.numel()
    nbytes = payload_nbytes(n)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=xf.device)
    check_payload(out, nbytes, "int8", xf.device)
    if n == 0:
        return out
    nb = triton.cdiv(n, BLOCK)
    scales, codes = _views(out, n)
    flag = torch.zeros(1, dtype=torch.int32, device=xf.device)
    grid = (triton.cdiv(nb, _ENCODE_ROWS),)
    _encode_kernel[grid](
        xf, scales, codes, flag, n, nb, ROWS=_ENCODE_ROWS, B=BLOCK, num_warps=_ENCODE_WARPS, **LAUNCH_OPTIONS
    )
    raise_for_flag(int(flag.item()), "int8")  # the one host sync: errors surface here, not a step later
    return out


def decode(
    payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """Decode an int8 payload of `numel` values.

    Args:
        payload: contiguous 1-D uint8 tensor of `payload_nbytes(numel)` bytes.
        numel: number of values encoded.
        out: optional contiguous fp32 tensor of `numel` elements on the payload's device.
        accumulate: add the decoded values into `out` (`out += decoded`) instead of overwriting it;
            requires `out`.

    Returns:
        `out`, or a new fp32 tensor of `numel` elements.

    Raises:
        ValueError: wrong payload size or dtype, `out` malformed, or `accumulate` without `out`.
    """
    check_payload(payload, payload_nbytes(numel), "int8")
    if out is None:
        if accumulate:
            raise ValueError("int8: accumulate=True needs out= (the tensor to add into)")
        out = torch.empty(numel, dtype=torch.float32, device=payload.device)
    of = flat_f32(out, "int8: out", payload.device)
    if of.numel() != numel:
        raise ValueError(f"int8: out has {of.numel()} elements, expected numel={numel}")
    if numel == 0:
        return out
    nb = triton.cdiv(numel, BLOCK)
    scales, codes = _views(payload, numel)
    grid = (triton.cdiv(nb, _DECODE_ROWS),)
    _decode_kernel[grid](
        scales, codes, of, numel, nb, ROWS=_DECODE_ROWS, B=BLOCK, ACCUMULATE=accumulate,
        num_warps=_DECODE_WARPS, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out
