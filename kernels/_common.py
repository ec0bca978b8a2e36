"""Pieces shared by the codec kernels: exact rounding, the finiteness check, argument checks.

Bit-exactness with the plain-PyTorch reference rests on three habits kept in every kernel:

* fp32 division is `tl.math.div_rn` (IEEE round-to-nearest). A plain `/` may lower to
  `div.full.f32` on NVIDIA GPUs, which is off by up to 2 ulp.
* Every launch passes `enable_fp_fusion=False`, so `a * b + c` is never contracted into an FMA
  (one rounding instead of the reference's two).
* Round-half-even is done with the 1.5 * 2**23 trick (`_rne`) instead of libdevice `rint`, which
  the interpreter (`TRITON_INTERPRET=1`) does not implement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LAUNCH_OPTIONS: dict[str, bool] = {"enable_fp_fusion": False}
"""Passed to every launch: no FMA contraction, so each mul and add rounds as the reference's do."""

_RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23
_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _rne(y):
    """Round fp32 `y` to the nearest integer, ties to even, for |y| < 2**22.

    Adding 1.5 * 2**23 moves `y` into [2**23, 2**24), where the fp32 spacing is exactly 1, so the
    hardware's round-to-nearest-even addition does the rounding; subtracting it back is exact.
    Callers only pass |y| <= 2**8 (codes are clamped right after).
    """
    return (y + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _not_finite(v):
    """True where fp32 `v` is NaN or +-Inf (NaN fails every comparison)."""
    return ~(tl.abs(v) <= _FLT_MAX)


NONFINITE = 1
"""Flag bit: some encoded value is NaN or Inf."""
OVERFLOW = 2
"""Flag bit: some encoded value is finite but so large that its decode would be Inf (the reference
rejects those too: `Codec._overflows` in swarm.compression)."""


@triton.jit
def _check_kernel(x_ptr, r_ptr, flag_ptr, n, L1: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """OR NONFINITE / OVERFLOW into `*flag_ptr` for `acc = x + r` (or `x` without `r`).

    The sum is checked, not its parts: two finite values can add up to Inf. OVERFLOW is the topk
    decode's `(2c - L1) * scale` overflowing: `|acc| * L1` is Inf.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        acc = acc + tl.load(r_ptr + offs, mask=mask, other=0.0)
    nonfinite = _not_finite(acc)
    overflow = _not_finite(tl.abs(acc) * L1)
    bits = tl.max(nonfinite.to(tl.int32) | (overflow.to(tl.int32) << 1), axis=0)  # NONFINITE | OVERFLOW
    tl.atomic_or(flag_ptr, bits, mask=bits > 0, sem="relaxed")


def check_async(x: torch.Tensor, residual: torch.Tensor | None, flag: torch.Tensor, levels: int) -> None:
    """Queue a check that ORs NONFINITE/OVERFLOW into `flag[0]` for `x (+ residual)`; no host sync.

    `levels` is the topk codec's L - 1, the factor the decode multiplies the scale by.
    """
    block = 4096
    grid = (triton.cdiv(x.numel(), block),)
    r = residual if residual is not None else x
    _check_kernel[grid](
        x, r, flag, x.numel(), L1=levels, HAS_RES=residual is not None, BLOCK=block, num_warps=8, **LAUNCH_OPTIONS
    )


_RESIDENT: dict[tuple, int] = {}
"""(kernel, device, launch options) -> programs the GPU runs at once, from its compiled resources."""


def resident_programs(kernel: triton.runtime.JITFunction, args: tuple, options: dict, work: int) -> int:
    """Grid size of a persistent kernel: at most `work` programs, and no more than fit on the GPU at once.

    A persistent program walks several work items and may own scratch memory; programs that did not
    fit would wait for a free slot and leave a tail. The count comes from the compiled kernel's
    registers and shared memory (compiled once here, as the launch would; `args` only need the
    launch's dtypes and alignments). CPU tensors (the interpreter) get 3 programs, so the tests
    walk several items per program too.

    Args:
        kernel: the `@triton.jit` function.
        args: positional launch arguments.
        options: constexpr and launch keyword arguments (`num_warps`, ...).
        work: number of work items.

    Returns:
        The number of programs to launch, between 1 and `work`.
    """
    device = args[0].device
    if device.type != "cuda":
        return max(1, min(work, 3))
    key = (kernel, device.index, tuple(sorted(options.items())))
    per_gpu = _RESIDENT.get(key)
    if per_gpu is None:
        props = torch.cuda.get_device_properties(device)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **options)
            compiled._init_handles()  # loads the binary: n_regs is read from it
            warps = compiled.metadata.num_warps
            regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256  # allocated per warp, 256 at a time
            per_sm = min(
                getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps),
                props.max_threads_per_multi_processor // (32 * warps),
                getattr(props, "shared_memory_per_multiprocessor", 233472) // (compiled.metadata.shared + 1024),
                32,
            )
        except (AttributeError, TypeError, ZeroDivisionError):  # another Triton's internals: a safe guess
            per_sm = 2
        per_gpu = _RESIDENT[key] = props.multi_processor_count * max(1, per_sm)
    return max(1, min(work, per_gpu))


def raise_for_flag(flag: int, codec: str) -> None:
    """Raise the ValueError a non-zero check flag stands for (NaN/Inf before overflow)."""
    if flag & NONFINITE:
        raise ValueError(f"{codec}: input has NaN/Inf")
    if flag & OVERFLOW:
        raise ValueError(f"{codec}: input has values so large that their decode would be Inf; scale it down")


def flat_f32(t: torch.Tensor, name: str, device: torch.device | None = None) -> torch.Tensor:
    """`t` as a flat fp32 view, or ValueError naming `name` and what to pass instead.

    Args:
        t: the tensor to check; must be contiguous fp32.
        name: how the caller's argument is called, for the message.
        device: when given, `t` must live there.

    Returns:
        `t.view(-1)` (no copy).

    Raises:
        ValueError: wrong dtype, not contiguous, or on another device.
    """
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}; convert with .float()")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass .contiguous()")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; move it with .to()")
    return t.view(-1)


def check_payload(payload: torch.Tensor, nbytes: int, codec: str, device: torch.device | None = None) -> None:
    """Raise ValueError unless `payload` is a contiguous flat uint8 tensor of exactly `nbytes` bytes."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
        raise ValueError(f"{codec}: payload must be a contiguous 1-D uint8 tensor, got {payload.dtype} {payload.shape}")
    if payload.numel() != nbytes:
        raise ValueError(f"{codec}: payload has {payload.numel()} bytes, expected {nbytes} for these parameters")
    if device is not None and payload.device != device:
        raise ValueError(f"{codec}: payload is on {payload.device} but the output is on {device}")
