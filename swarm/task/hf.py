"""Hugging Face causal language models as the train task's model: `--model hf:PATH_OR_NAME`.

PATH_OR_NAME is a local folder holding a `config.json` (weights and a tokenizer beside it when there are
any) or a hub name already in the local hub cache: nothing is ever downloaded (`local_files_only`). With
weights the model starts from them; with a config only it is initialised from `--seed` (the same weights
on every peer). Its tokenizer, when the folder has one, tokenizes `--data` (`swarm.task.tokens`); without
one the data are bytes and the model's vocabulary must hold 256 of them.

`HFCausalLM` gives the wrapped model the `loss(batch)` the train task and `evaluate` call: the batch is
[B, T + 1] token ids and the loss the mean next-token cross entropy, as the built-in model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swarm.task.model import load_flat
from swarm.utils import unshadow_kernels

PREFIX = "hf:"


def is_hf(model: str) -> bool:
    """Whether `model` names a Hugging Face model (`hf:PATH_OR_NAME`)."""
    return model.startswith(PREFIX)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network, whatever the caller asks
    unshadow_kernels()
    try:
        import transformers
    except ImportError as e:
        raise ValueError("--model hf:... needs the `transformers` package: pip install 'swarm-train[hf]'") from e
    transformers.logging.set_verbosity_error()
    return transformers


class HFCausalLM(nn.Module):
    """A `transformers` causal LM with the built-in model's `loss(batch)`."""

    def __init__(self, model: nn.Module, spec: str) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        """What built it (`hf:PATH_OR_NAME`): the checkpoint's manifest records it, export rebuilds from it."""

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy (fp32) of batch[:, 1:] given batch[:, :-1]; batch is [B, T + 1]."""
        logits = self.model(input_ids=batch[:, :-1]).logits
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def source(spec: str) -> str:
    """The folder or hub name of `hf:PATH_OR_NAME`.

    Raises:
        ValueError: nothing after the prefix.
    """
    name = spec[len(PREFIX):]
    if not name:
        raise ValueError("--model hf: needs a folder or a hub name after `hf:` (e.g. hf:./my-llama)")
    return name


def load_hf(spec: str, seed: int = 0) -> tuple[HFCausalLM, Any]:
    """The model `spec` names and its tokenizer (None when it has none), on the CPU, in fp32.

    Raises:
        ValueError: no such folder or cached name, no config, or `transformers` missing (the message says which).
    """
    tf = _transformers()
    name = source(spec)
    path = Path(name)
    if (path.exists() and not path.is_dir()) or (not path.exists() and name.startswith((".", "/", "~"))):
        raise ValueError(f"--model {spec}: {name} is not a folder")
    try:
        config = tf.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {spec}: no model config found (a folder with config.json, or a hub name in the "
                         f"local cache; nothing is downloaded): {str(e).splitlines()[0]}") from e
    has_weights = path.is_dir() and any(any(path.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin"))
    if has_weights or not path.is_dir():
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(name, local_files_only=True, torch_dtype=torch.float32)
        except OSError:
            model = None  # a cached config without weights: initialise from the seed
    else:
        model = None
    if model is None:
        with torch.random.fork_rng(devices=[]):  # the same weights on every peer; the caller's RNG untouched
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    if tokenizer is None and int(config.vocab_size) < 256:
        raise ValueError(f"--model {spec} has no tokenizer and a vocabulary of {config.vocab_size} < 256: the data "
                         "would be bytes; add a tokenizer to the folder")
    model.train()
    return HFCausalLM(model, spec), tokenizer


def save_pretrained(spec: str, theta: torch.Tensor, out: Path) -> int:
    """Write the model `spec` names with the flat trainable parameters `theta` in `save_pretrained` format (its
    tokenizer too, when it has one) into `out`; returns the parameter count.

    Raises:
        ValueError: the model cannot be built, or `theta` does not fit it.
    """
    wrapped, tokenizer = load_hf(spec)
    try:
        load_flat(wrapped, theta)
    except ValueError as e:
        raise ValueError(f"{spec}: {e}") from None
    wrapped.model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return sum(p.numel() for p in wrapped.parameters())
