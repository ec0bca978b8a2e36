"""The topk decode kernel: a payload of docs/codecs.md back to fp32, bit-exact with the reference.

Usage::

    from swarm.kernels import topk_decode

    y = topk_decode(payload, n, chunk=4096, k=64, bits=2)      # zeros except the selection
    topk_decode(payload, n, chunk=4096, k=64, bits=2, out=acc, accumulate=True)   # acc += decoded

Each program owns ROWS chunks: it zeroes them (unless accumulating) and scatters their k decoded
entries, `((2c - (L - 1)) * scale) / (L - 1)` rounded as the reference's. Every chunk size the
format allows is decoded here (the encode kernel stops at 4,096).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swarm.kernels._common import LAUNCH_OPTIONS, check_payload, flat_f32
from swarm.kernels.topk_format import layout, payload_nbytes, slot_fields, views

_DECODE_SLOTS = 2048  # (chunk, slot) pairs decoded per step of a program
_ZERO_TILE = 4096  # values zeroed per step of a decode program


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
        idx, code = slot_fields(iw_rows, vw_rows, slots[None, :], m2, C, IB, B)
        dec = tl.math.div_rn((2 * code - L1).to(tl.float32) * scale[:, None], L1 * 1.0)
        pos = rows[:, None] * C + idx
        m = m2 & (pos < n)  # slots in the zero padding are dropped
        # Indices within a chunk are distinct in any payload the encoder wrote, so no two lanes touch
        # the same element (a corrupted payload with repeats gives unspecified values there, no crash).
        if ACCUMULATE:
            dec = tl.load(out_ptr + pos, mask=m, other=0.0) + dec
        tl.store(out_ptr + pos, dec, mask=m)


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
    nc, ib, _, _ = layout(numel, chunk, k, bits)
    scales, iwords, vwords = views(payload, numel, chunk, k, bits)
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
