"""The codec interface, error-feedback state and the hook through which kernels take over CUDA tensors.

The wire formats are specified in docs/codecs.md. A `Codec`'s public `encode`/`decode` validate their
arguments, then run either a registered kernel (CUDA tensors, when `swarm.kernels` provides one) or
the plain-PyTorch reference (`encode_reference`/`decode_reference`), which defines the result.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch

from swarm.compression.feedback import ErrorFeedback

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    # The payload is built with Tensor.view(torch.uint8), which exposes host byte order; the wire
    # format is little-endian.
    raise ImportError("swarm.compression needs a little-endian host")


class CodecKernel(Protocol):
    """A fast implementation of one codec for CUDA tensors, registered with `register_kernel`.

    It must produce the same payload bytes and decoded values as the codec's reference. It receives
    arguments already checked for type, shape, dtype, device and payload size; `feedback`, when given,
    has a residual of the right size (allocated, zero, if it was None).
    """

    checks_values: bool
    """True if `encode` itself rejects NaN/Inf (and values whose decode would overflow) with the
    codec's ValueError before writing the payload or the residual; False to have the caller check
    first (one extra read of the input)."""

    def encode(self, x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
        """Returns the payload of `x` (plus and updating `feedback.residual`, when given)."""
        ...

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
        """Writes the decoded values into `out` (fp32, `numel` elements, zeroed by nobody) and returns it."""
        ...


KernelFactory = Callable[["Codec"], CodecKernel | None]
"""Given a codec (its parameters), returns a kernel for it, or None when it does not support them."""

_factories: dict[str, KernelFactory] = {}
_kernel_cache: dict[Codec, CodecKernel | None] = {}
_kernels_imported = False
_lock = threading.Lock()


def register_kernel(family: str, factory: KernelFactory) -> None:
    """Make `factory` the fast path for CUDA tensors of every codec of `family`.

    `swarm.kernels` calls this when imported; `swarm.compression` imports it lazily, the first time
    a codec meets a CUDA tensor, and carries on with the reference if the import fails.

    Args:
        family: the codec family, `Codec.family`: "none", "bf16", "fp16", "int8" or "topk" (sparseloco
            is a topk codec with error feedback).
        factory: called once per codec instance; returns a `CodecKernel` or None to leave that codec
            to the reference.
    """
    with _lock:
        _factories[family] = factory
        _kernel_cache.clear()


def kernel_for(codec: Codec) -> CodecKernel | None:
    """Returns the registered kernel for `codec`, or None; imports `swarm.kernels` on first use.

    Raises nothing when `swarm.kernels` (or Triton) is missing: the reference then runs.
    """
    global _kernels_imported
    if not _kernels_imported:
        _kernels_imported = True
        try:
            importlib.import_module("swarm.kernels")
        except ImportError as e:
            log.debug("swarm.kernels not importable (%s); codecs run the reference on CUDA", e)
    with _lock:
        if codec not in _kernel_cache:
            factory = _factories.get(codec.family)
            _kernel_cache[codec] = None if factory is None else factory(codec)
        return _kernel_cache[codec]


def true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """`a / b` as an IEEE fp32 division on every device.

    PyTorch's CUDA kernel turns a division by a Python scalar into a multiplication by its reciprocal,
    which rounds differently; dividing by a 0-d tensor on a's device keeps the true division the
    wire formats specify (and what the CPU computes).
    """
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or Inf: one min/max pass, no temporary (both propagate NaN).

    `torch.isfinite(t).all()` writes a bool per element first; on the CPU that was 30x slower and
    the largest cost of a raw all-reduce round.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def as_dtype(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a 1-D uint8 slice as `dtype`, copying only when its offset is misaligned for it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if buf.storage_offset() % itemsize:
        buf = buf.clone()
    return buf.view(dtype)


class Codec(ABC):
    """Turns a flat fp32 tensor into a uint8 payload of a size known in advance, and back.

    Subclasses implement `payload_nbytes`, `_encode` and `_decode` (plain PyTorch, vectorised,
    any device); validation, error feedback and kernel dispatch live here.
    """

    name: str
    """The codec's name in configs: "none", "bf16", "fp16", "int8", "topk" or "sparseloco"."""
    family: str
    """The wire format it writes, the key for `register_kernel` (sparseloco's is "topk")."""

    stores_values: bool = False
    """The payload is the input's own little-endian fp32 bytes (`none`): `encode`/`decode` may then
    alias memory instead of copying (`alias=True`)."""

    @property
    def uses_error_feedback(self) -> bool:
        """Whether peers should keep an `ErrorFeedback` for this codec and pass it to `encode`."""
        return False

    @property
    def block(self) -> int:
        """Elements encoded independently of their neighbours (int8 block, top-k chunk; 1 for casts).

        Encoding slices that start on multiples of `block` gives the same values as encoding the
        whole tensor, which lets the all-reduce cut a tensor into parts anywhere on that grid.
        """
        return 1

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Returns the exact payload size for `numel` input elements, known before encoding."""

    def result_codec(self, members: int) -> Codec:
        """Returns the codec an all-reduce owner encodes its reduced part with (docs/codecs.md).

        Args:
            members: how many peers' contributions were summed (>= 1).

        Raises:
            ValueError: members < 1.
        """
        _check_members(members)
        return self

    # ------------------------------------------------------------------ numerics hooks

    @abstractmethod
    def _encode(self, x: torch.Tensor, payload: torch.Tensor) -> None:
        """Writes the payload of finite, non-empty `x` into `payload` (uint8, payload_nbytes)."""

    @abstractmethod
    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        """Writes the decoded values into `out` (fp32, numel > 0 elements, contents undefined)."""

    def _overflows(self, absmax: torch.Tensor) -> torch.Tensor:
        """Whether an input whose largest |x| is `absmax` (0-d fp32) encodes or decodes to Inf.

        The spec only rejects NaN/Inf input; finite inputs this large would otherwise come back as
        Inf (fp16 rounding, or the decode formula's product overflowing), so they are rejected too.
        """
        return torch.zeros((), dtype=torch.bool, device=absmax.device)

    # ------------------------------------------------------------------ public face

    def encode(self, x: torch.Tensor, feedback: ErrorFeedback | None = None, *, alias: bool = False) -> torch.Tensor:
        """Encode `x` (with error feedback when `feedback` is given).

        Runs a registered kernel for CUDA tensors when there is one, else `encode_reference`.

        Args:
            x: 1-D contiguous float32 tensor, any device.
            feedback: this peer's error-feedback state for `x`; its residual is added to `x` before
                encoding and replaced by what the payload leaves out. Untouched when this raises.
            alias: the payload may share x's memory where the format allows (`stores_values`), for a
                payload used before x changes and checked by whoever decodes it (sent on the wire:
                the all-reduce refuses NaN/Inf in what it receives, naming the sender). Such a
                payload is x's bytes as they are: its values are not checked here.

        Returns:
            1-D uint8 tensor of `payload_nbytes(x.numel())` bytes on x's device.

        Raises:
            TypeError: x is not a tensor.
            ValueError: x is not a 1-D contiguous float32 tensor, contains NaN/Inf or values too large
                for the format, or feedback's residual does not match x.
        """
        self._check_input(x, feedback)
        if alias and self.stores_values and feedback is None:
            return x.view(torch.uint8)
        kernel = kernel_for(self) if x.is_cuda and x.numel() else None
        if kernel is None:
            return self._encode_checked(x, feedback)
        if not kernel.checks_values:
            self._check_values(x, feedback)
        if feedback is not None and feedback.residual is None:
            feedback.residual = torch.zeros_like(x)  # same state as None: all zeros
        return kernel.encode(x, feedback)

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor | None = None, *,
               alias: bool = False) -> torch.Tensor:
        """Decode a payload of `numel` elements.

        Args:
            payload: 1-D uint8 tensor of exactly `payload_nbytes(numel)` bytes.
            numel: number of elements that were encoded.
            out: optional 1-D contiguous float32 tensor of `numel` elements on payload's device to
                write into.
            alias: without `out`, the values may be a view of the payload where the format allows
                (`stores_values`; a misaligned payload is copied).

        Returns:
            `out`, or a new 1-D float32 tensor on payload's device (or a view of the payload).

        Raises:
            ValueError: payload is not 1-D uint8 of the right size, or `out` does not fit.
        """
        if alias and self.stores_values and out is None:
            return as_dtype(self._checked_payload(payload, numel), torch.float32)
        payload, out = self._check_payload(payload, numel, out)
        kernel = kernel_for(self) if payload.is_cuda and numel else None
        if kernel is not None:
            return kernel.decode(payload, numel, out)
        if numel:
            self._decode(payload, numel, out)
        return out

    def encode_reference(self, x: torch.Tensor, feedback: ErrorFeedback | None = None) -> torch.Tensor:
        """`encode` without the kernel fast path: the plain-PyTorch result kernels must match."""
        self._check_input(x, feedback)
        return self._encode_checked(x, feedback)

    def decode_reference(self, payload: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`decode` without the kernel fast path: the plain-PyTorch result kernels must match."""
        payload, out = self._check_payload(payload, numel, out)
        if numel:
            self._decode(payload, numel, out)
        return out

    # ------------------------------------------------------------------ internals

    def _encode_checked(self, x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
        n = x.numel()
        payload = torch.empty(self.payload_nbytes(n), dtype=torch.uint8, device=x.device)
        if n == 0:
            return payload
        if feedback is None:
            self._check_values(x, None)
            self._encode(x, payload)
            return payload
        acc = x if feedback.residual is None else x + feedback.residual
        self._check_values(x, feedback, acc)
        self._encode(acc, payload)
        decoded = torch.empty_like(acc)
        self._decode(payload, n, decoded)
        # Written only now, after every check passed: a rejected input leaves the state untouched.
        feedback.residual = acc - decoded
        return payload

    def _check_input(self, x: torch.Tensor, feedback: ErrorFeedback | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name} codec: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
            raise ValueError(
                f"{self.name} codec: input must be a 1-D contiguous float32 tensor, got dtype={x.dtype} "
                f"shape={tuple(x.shape)} contiguous={x.is_contiguous()}; pass x.float().reshape(-1).contiguous()"
            )
        if feedback is not None and feedback.residual is not None:
            r = feedback.residual
            if r.dtype != torch.float32 or r.dim() != 1 or r.numel() != x.numel() or r.device != x.device:
                raise ValueError(
                    f"{self.name} codec: feedback.residual (dtype={r.dtype}, shape={tuple(r.shape)}, "
                    f"device={r.device}) does not match the input (float32, ({x.numel()},), {x.device}); "
                    f"keep one ErrorFeedback per tensor, or reset() it"
                )

    def _check_values(self, x: torch.Tensor, feedback: ErrorFeedback | None, acc: torch.Tensor | None = None) -> None:
        """Raise ValueError if the encoded tensor (x, or x + residual) holds NaN/Inf or overflows.

        One reduction on the happy path and no temporary: min and max are NaN if any element is NaN,
        and max|.| = max(-min, max) is Inf if any element is +-Inf.
        """
        if acc is None:
            acc = x if feedback is None or feedback.residual is None else x + feedback.residual
        lo, hi = torch.aminmax(acc)
        absmax = torch.maximum(-lo, hi)
        if bool(torch.isfinite(absmax)):
            if bool(self._overflows(absmax)):
                raise ValueError(
                    f"{self.name} codec: input has values of magnitude {float(absmax):.6g}, whose encoding "
                    f"would decode to Inf; scale the tensor down or use a wider codec"
                )
            return
        if acc is not x and all_finite(x):
            raise ValueError(
                f"{self.name} codec: input plus the error-feedback residual is not finite; "
                f"reset() the ErrorFeedback or lower the learning rate"
            )
        raise ValueError(f"{self.name} codec: input contains NaN or Inf; nothing was encoded")

    def _check_payload(
        self, payload: torch.Tensor, numel: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        payload = self._checked_payload(payload, numel)
        if out is None:
            return payload, torch.empty(numel, dtype=torch.float32, device=payload.device)
        if (
            out.dtype != torch.float32
            or out.dim() != 1
            or out.numel() != numel
            or not out.is_contiguous()
            or out.device != payload.device
        ):
            raise ValueError(
                f"{self.name} codec: out must be a 1-D contiguous float32 tensor of {numel} elements on "
                f"{payload.device}, got dtype={out.dtype} shape={tuple(out.shape)} device={out.device}"
            )
        return payload, out

    def _checked_payload(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """`payload`, contiguous, once it is a 1-D uint8 tensor of the size `numel` elements need."""
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"{self.name} codec: numel must be a non-negative int, got {numel!r}")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"{self.name} codec: payload must be a 1-D uint8 tensor")
        expected = self.payload_nbytes(numel)
        if payload.numel() != expected:
            raise ValueError(
                f"{self.name} codec: payload has {payload.numel()} bytes but {numel} elements need "
                f"{expected}; sender and receiver must agree on the codec and the element count"
            )
        return payload.contiguous()


def _check_members(members: int) -> None:
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"result_codec: members must be an int >= 1, got {members!r}")
