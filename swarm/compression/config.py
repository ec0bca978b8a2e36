"""Configuration of the pseudo-gradient codec (the `[codec]` TOML table) and the codec factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from swarm.compression.base import Codec
from swarm.compression.dense import BFloat16Codec, Float16Codec, Float32Codec, Int8Codec
from swarm.compression.topk import SPARSELOCO, TopKCodec, check_topk_params

CodecName = Literal["none", "bf16", "fp16", "int8", "topk", "sparseloco"]
"""The codecs docs/codecs.md specifies."""

_DENSE: dict[str, type[Codec]] = {
    "none": Float32Codec,
    "bf16": BFloat16Codec,
    "fp16": Float16Codec,
    "int8": Int8Codec,
}


@dataclass(kw_only=True, slots=True)
class CodecConfig:
    """Which codec peers use for pseudo-gradients; chunk/k/bits/error_feedback apply to topk only."""

    name: CodecName = "none"
    """Codec: none (fp32), bf16, fp16, int8, topk, or sparseloco (topk C=4096 k=64 b=2 with error feedback)."""
    chunk: int | None = None
    """topk chunk size C, a power of two in [256, 65536] (default 4096); fixed by sparseloco."""
    k: int | None = None
    """topk entries kept per chunk, a multiple of 32 and at most chunk (default 64); fixed by sparseloco."""
    bits: int | None = None
    """topk value-code width: 2, 4 or 8 (default 2); fixed by sparseloco."""
    error_feedback: bool | None = None
    """topk: keep each peer's error-feedback residual (default off); always on for sparseloco."""

    def __post_init__(self) -> None:
        if self.name not in get_args(CodecName):
            raise ValueError(f"codec.name must be one of {list(get_args(CodecName))}, got {self.name!r}")
        topk_options = {"chunk": self.chunk, "k": self.k, "bits": self.bits, "error_feedback": self.error_feedback}
        if self.name in _DENSE:
            for option, value in topk_options.items():
                if value is not None:
                    raise ValueError(
                        f"codec.{option} only applies to codec.name = 'topk' or 'sparseloco'; "
                        f"remove it for codec.name = {self.name!r}"
                    )
            return
        if self.name == "sparseloco":
            preset = {**SPARSELOCO, "error_feedback": True}
            for option, value in topk_options.items():
                if value is not None and value != preset[option]:
                    raise ValueError(
                        f"codec.{option} = {value!r} conflicts with the sparseloco preset ({option} = "
                        f"{preset[option]!r}); remove it, or set codec.name = 'topk' to choose your own"
                    )
            self.chunk, self.k, self.bits, self.error_feedback = (
                SPARSELOCO["chunk"],
                SPARSELOCO["k"],
                SPARSELOCO["bits"],
                True,
            )
            return
        self.chunk = SPARSELOCO["chunk"] if self.chunk is None else self.chunk
        self.k = SPARSELOCO["k"] if self.k is None else self.k
        self.bits = SPARSELOCO["bits"] if self.bits is None else self.bits
        self.error_feedback = False if self.error_feedback is None else self.error_feedback
        if not isinstance(self.error_feedback, bool):
            # ValueError like every other config check, so callers catch one type for bad config.
            raise ValueError(f"codec.error_feedback must be true or false, got {self.error_feedback!r}")  # noqa: TRY004
        check_topk_params(self.chunk, self.k, self.bits, prefix="codec.")


def make_codec(config: CodecConfig) -> Codec:
    """Build the codec a config names.

    Args:
        config: a validated CodecConfig.

    Returns:
        The codec; equal configs give equal (and equally hashed) codecs.
    """
    if config.name in _DENSE:
        return _DENSE[config.name]()
    if config.name == "sparseloco":
        return TopKCodec.sparseloco()
    assert config.chunk is not None and config.k is not None and config.bits is not None  # set in __post_init__
    return TopKCodec(chunk=config.chunk, k=config.k, bits=config.bits, error_feedback=bool(config.error_feedback))
