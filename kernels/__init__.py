"""Triton kernels for the pseudo-gradient codecs, installed as ``swarm.kernels``.

They produce the payloads of docs/codecs.md bit for bit, like the plain-PyTorch reference in
``swarm.compression``, and take torch tensors: CUDA tensors on a GPU, or CPU tensors when
``TRITON_INTERPRET=1`` is set before this package's kernels are first imported (how the tests run).

Usage::

    from swarm.kernels import int8_encode, int8_decode, topk_encode, topk_decode

    payload = int8_encode(x)
    y = int8_decode(payload, x.numel())

    payload = topk_encode(x, residual, chunk=4096, k=64, bits=2)   # residual updated in place
    topk_decode(payload, x.numel(), chunk=4096, k=64, bits=2, out=acc, accumulate=True)

Importing this package registers the kernels with ``swarm.compression`` (``register_kernel``), so
``Codec.encode``/``decode`` run them for CUDA tensors (see ``swarm.kernels.codecs``).

Triton is an optional dependency: importing this package does not import it; the first use of a
name below does (ImportError if Triton is missing). Each name's docstring gives its arguments.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "int8_decode",
    "int8_encode",
    "int8_payload_nbytes",
    "topk_decode",
    "topk_encode",
    "topk_payload_nbytes",
]

# public name -> (submodule, attribute); loaded on first access so `import swarm.kernels` never needs Triton.
_LAZY = {
    "int8_encode": ("int8", "encode"),
    "int8_decode": ("int8", "decode"),
    "int8_payload_nbytes": ("int8", "payload_nbytes"),
    "topk_encode": ("topk", "encode"),
    "topk_decode": ("topk", "decode"),
    "topk_payload_nbytes": ("topk", "payload_nbytes"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def _register_with_codecs() -> None:
    from swarm.compression import register_kernel
    from swarm.kernels.codecs import int8_factory, topk_factory

    register_kernel("int8", int8_factory)
    register_kernel("topk", topk_factory)


_register_with_codecs()
