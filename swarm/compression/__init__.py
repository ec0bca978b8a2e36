"""Pseudo-gradient codecs: the plain-PyTorch reference of the wire formats in docs/codecs.md.

`make_codec(CodecConfig(name=...))` builds one; `Codec.encode`/`decode` run a registered Triton
kernel for CUDA tensors when `swarm.kernels` provides one (`register_kernel`), else the reference.
"""

from swarm.compression.base import Codec, CodecKernel, all_finite, kernel_for, register_kernel
from swarm.compression.config import CodecConfig, CodecName, make_codec
from swarm.compression.dense import BFloat16Codec, Float16Codec, Float32Codec, Int8Codec
from swarm.compression.feedback import Contribution, ErrorFeedback
from swarm.compression.topk import TopKCodec

__all__ = [
    "BFloat16Codec",
    "Codec",
    "CodecConfig",
    "CodecKernel",
    "CodecName",
    "Contribution",
    "ErrorFeedback",
    "Float16Codec",
    "Float32Codec",
    "Int8Codec",
    "TopKCodec",
    "all_finite",
    "kernel_for",
    "make_codec",
    "register_kernel",
]
