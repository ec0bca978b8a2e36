"""The kernels as `swarm.compression` codec kernels: the fast path of `Codec.encode`/`decode` on CUDA.

`import swarm.kernels` registers `int8_factory` and `topk_factory` with
`swarm.compression.register_kernel`; `swarm.compression` imports this package the first time a codec
meets a CUDA tensor. CPU tensors always take the reference. Triton is imported when a factory is
first called, and a factory returns None (the reference then runs) when Triton is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NoReturn

import torch

from swarm.compression import Codec, ErrorFeedback, Int8Codec, TopKCodec


def _kernel_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"swarm.kernels.{name}")
    except ImportError:  # Triton missing: leave the codec to the reference
        return None


def _reraise_as_codec(codec: Codec, x: torch.Tensor, feedback: ErrorFeedback | None, err: ValueError) -> NoReturn:
    """Re-raise a kernel's rejection with the reference's own message (it rechecks; error path only).

    The recheck runs on CPU copies: on CUDA, PyTorch divides by a Python scalar as a multiplication
    by its reciprocal, so the reference's overflow test `(max / 127) * 127` can differ there.
    """
    residual = None if feedback is None or feedback.residual is None else feedback.residual.cpu()
    codec._check_values(x.cpu(), None if residual is None else ErrorFeedback(residual=residual))
    raise err


class _Int8Kernel:
    """int8 through the Triton kernels; error feedback, when asked for, around them in torch."""

    checks_values = True  # the encode kernel flags NaN/Inf and overflow in the same pass

    def __init__(self, codec: Int8Codec, module: ModuleType) -> None:
        self._codec = codec
        self._k = module

    def encode(self, x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
        """Returns the payload of `x` (plus `feedback.residual`, which is then replaced in place)."""
        acc = x if feedback is None else x + feedback.residual
        try:
            payload = self._k.encode(acc)
        except ValueError as err:
            _reraise_as_codec(self._codec, x, feedback, err)
        if feedback is not None:
            feedback.residual.copy_(acc - self._k.decode(payload, acc.numel()))
        return payload

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
        """Writes the decoded values into `out` and returns it."""
        return self._k.decode(payload, numel, out=out)


class _TopKKernel:
    """topk / sparseloco through the fused Triton kernels (error feedback inside the kernel).

    With error feedback the new residual goes to a fresh tensor that replaces `feedback.residual`
    once the encode succeeded, as the reference does (`feedback.residual = acc - decoded`): the
    value check then runs in the encode pass itself, and x and the residual are read once. That
    costs a second residual-sized buffer during the call (the caching allocator reuses the old one
    on the next call).
    """

    checks_values = True  # the encode kernel flags NaN/Inf and overflow; the state is replaced only after

    def __init__(self, codec: TopKCodec, module: ModuleType) -> None:
        self._codec = codec
        self._k = module
        self._params = {"chunk": codec.chunk, "k": codec.k, "bits": codec.bits}

    def encode(self, x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
        """Returns the payload of `x` (plus `feedback.residual`, which is then replaced by a new tensor)."""
        residual = None if feedback is None else feedback.residual
        new_residual = None if residual is None else torch.empty_like(residual)
        try:
            payload = self._k.encode(x, residual, residual_out=new_residual, **self._params)
        except ValueError as err:
            _reraise_as_codec(self._codec, x, feedback, err)
        if feedback is not None:
            feedback.residual = new_residual
        return payload

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
        """Writes the decoded values into `out` (zeros outside the selection) and returns it."""
        return self._k.decode(payload, numel, out=out, **self._params)


def int8_factory(codec: Codec) -> _Int8Kernel | None:
    """The int8 kernel for `codec`, or None without Triton."""
    module = _kernel_module("int8")
    return None if module is None or not isinstance(codec, Int8Codec) else _Int8Kernel(codec, module)


def topk_factory(codec: Codec) -> _TopKKernel | None:
    """The fused topk kernel for `codec`, or None without Triton.

    Every valid chunk/k/bits; chunks above 4096 are encoded by the reference inside it (see
    `swarm.kernels.topk.encode`) and decoded by the kernel.

    Zero-level codes (result codecs) have no kernel yet: the reference runs them.
    """
    if not isinstance(codec, TopKCodec) or codec.zero_level:
        return None
    module = _kernel_module("topk")
    return None if module is None else _TopKKernel(codec, module)
