"""The built-in training task: a LLaMA-style byte-level language model and its corpus.

The corpus is the running Python's standard library source (found on every machine with
Python, so nothing is downloaded), or the user's own text files.
"""

from swarm.task.data import Batches, Corpus, DataConfig, evaluate
from swarm.task.model import SIZES, ByteLM, ModelConfig, build_model, count_params, load_flat

__all__ = [
    "SIZES",
    "Batches",
    "ByteLM",
    "Corpus",
    "DataConfig",
    "ModelConfig",
    "build_model",
    "count_params",
    "evaluate",
    "load_flat",
]
