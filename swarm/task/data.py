"""The built-in corpus (this Python's standard library source) or the user's files, as bytes.

Files are raw bytes (the model is byte-level, so any encoding is fine), split into a train
and a held-out eval set *by file* using a hash of each file's relative path, and joined with a
single 0 byte between files. Byte 0 never occurs in text, so it acts as a document boundary the
model learns to predict. Peers train on disjoint contiguous shards of the train bytes; `Batches`
draws random windows from a shard; `evaluate` scores fixed eval windows.

Any amount of text can be used: files of 1 MiB or more are memory-mapped, not read, and the
train and eval sets are `ByteSeq`s, a virtual concatenation of the files that copies nothing,
so only the windows drawn are ever read from disk. Small files are read into memory and joined.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swarm.task.bytes import ByteSeq
from swarm.task.model import ByteLM

log = logging.getLogger("swarm.task")

SEPARATOR = b"\0"
"""Byte placed between two files in the concatenated train and eval sets."""

_SEPARATOR_ARRAY = np.frombuffer(SEPARATOR, dtype=np.uint8)
_MiB = 1 << 20
# Files of at least this size are memory-mapped, smaller ones read into memory and joined. Not
# everything is mapped because in Python 3.11 every mmap keeps a duplicate of its file descriptor
# open for as long as it lives: the thousands of small files of a typical corpus would exhaust
# the open-file limit (often 1024), while reading them costs little memory.
_MAP_MIN_BYTES = 1 * _MiB
# Above this many bytes of small files held in memory (by every peer), loading warns.
_WARN_IN_MEMORY_BYTES = 2 << 30
# Directories left out of the built-in corpus: tests are a large, repetitive share of the stdlib
# (and not always valid UTF-8), idlelib is GUI code, the rest is not the stdlib's own source.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib"}
)
# Files found by walking a user directory count as binary (and are skipped) when their first
# bytes hold a 0 byte, the rule git uses to tell text from binary.
_BINARY_SNIFF_BYTES = 8192


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training text comes from and how it is cut into batches (the `[data]` TOML table)."""

    paths: list[str] = field(default_factory=list)
    """Text files or directories (searched recursively); empty = the built-in standard-library corpus."""
    eval_fraction: float = 0.02
    """Share of files held out for evaluation, chosen by path hash; at least one file (or tail of one)."""
    max_bytes: int = 0
    """Cap on the bytes used, files taken in sorted order and the last one cut; 0 = no cap (all the text)."""
    seq_len: int = 128
    """Bytes of context per training window (each window holds seq_len + 1 bytes)."""
    batch_size: int = 8
    """Windows per batch."""
    seed: int = 0
    """Seed of the window sampler; each peer mixes in its own index."""
    text_field: str = "text"
    """With a tokenizer (--model hf:...): the field of a JSONL record or the column of a Parquet file that holds
    the text."""
    cache_dir: str = ""
    """With a tokenizer: where token ids are kept after the first tokenization ("": ~/.cache/swarm/tokens)."""

    def __post_init__(self) -> None:
        self.paths = [os.fspath(path) for path in self.paths]
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_bytes < 0:
            raise ValueError(f"data.max_bytes must be >= 0 (0 = no cap), got {self.max_bytes}")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")

    @property
    def window(self) -> int:
        """Bytes in one window: seq_len inputs plus the last target."""
        return self.seq_len + 1


@dataclass(frozen=True, slots=True)
class _File:
    name: str  # relative path, '/'-separated: the split hashes it, so it must not depend on the OS
    data: np.ndarray  # 1-D uint8: an np.memmap for a large file, in memory for a small one


def stdlib_root() -> Path:
    """Directory of the running Python's standard library (the built-in corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """(relative name, path) of every non-hidden file under root, sorted by name."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning dirnames in place stops os.walk from descending into them at all.
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith("."):
                path = Path(dirpath, filename)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def _read(path: Path) -> np.ndarray | None:
    """The file's bytes, memory-mapped read-only if large, read if small; None if it cannot be read.

    Raises:
        ValueError: the process ran out of file descriptors (too many large files mapped).
    """
    try:
        if path.stat().st_size >= _MAP_MIN_BYTES:
            return np.memmap(path, dtype=np.uint8, mode="r")
        return np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            # Not a property of this file: skipping it (and every file after it) would silently drop text.
            raise ValueError(
                f"ran out of open files reading {path}: every file of {_MAP_MIN_BYTES // _MiB} MiB or more is "
                "memory-mapped and keeps a file descriptor open; join the data into fewer, larger files "
                "or raise the open-file limit (ulimit -n)"
            ) from e
        return None  # unreadable (permissions, a dangling link): the corpus simply goes without it


def _looks_binary(data: np.ndarray) -> bool:
    return bool((data[:_BINARY_SNIFF_BYTES] == SEPARATOR[0]).any())


def _stdlib_files() -> Iterator[_File]:
    for name, path in _walk(stdlib_root(), _STDLIB_SKIP_DIRS):
        if name.endswith(".py") and (data := _read(path)) is not None:
            yield _File(name, data)


def _user_files(paths: list[str]) -> Iterator[_File]:
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            # resolve() so that "." contributes its real name to the relative names.
            path = path.resolve()
            for name, file in _walk(path, frozenset({"__pycache__"})):
                data = _read(file)
                if data is not None and not _looks_binary(data):
                    yield _File(f"{path.name}/{name}", data)
        elif path.is_file():
            # A file named explicitly is used as it is, binary-looking or not: the user asked for it.
            data = _read(path)
            if data is None:
                raise ValueError(f"data path {arg!r} cannot be read; check its permissions")
            yield _File(path.name, data)
        else:
            raise ValueError(f"data path {arg!r} does not exist; pass existing files or directories to --data")


def _capped(files: Iterator[_File], max_bytes: int) -> list[_File]:
    """Files in order until max_bytes; the last one is truncated to fit, later ones are not read."""
    kept: list[_File] = []
    total = 0
    for file in files:
        if max_bytes and total + len(file.data) >= max_bytes:
            kept.append(_File(file.name, file.data[: max_bytes - total]))
            break
        kept.append(file)
        total += len(file.data)
    return kept


def _eval_score(name: str) -> float:
    """A uniform number in [0, 1) from the file's relative path, stable across runs and machines."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _split(files: list[_File], config: DataConfig) -> tuple[list[_File], list[_File]]:
    """(train, eval) by path hash: a file's side depends on its own path only, so adding files moves nothing."""
    if len(files) == 1:
        # One file cannot be split by file: hold out its tail instead (at least one window).
        (file,) = files
        cut = max(math.ceil(len(file.data) * config.eval_fraction), config.window)
        head, tail = file.data[: len(file.data) - cut], file.data[len(file.data) - cut :]
        return [_File(file.name, head)], [_File(file.name + "#tail", tail)]
    # Indices, not names: two files given by path may share a name.
    by_score = sorted(range(len(files)), key=lambda i: _eval_score(files[i].name))
    held = sum(1 for i in by_score if _eval_score(files[i].name) < config.eval_fraction)
    # At least one eval file, at least one train file, and enough eval bytes for one window:
    # take further files in hash order until there are.
    held = min(max(held, 1), len(files) - 1)
    while held < len(files) - 1 and _joined_len([files[i] for i in by_score[:held]]) < config.window:
        held += 1
    eval_ids = set(by_score[:held])
    train = [f for i, f in enumerate(files) if i not in eval_ids]
    return train, [f for i, f in enumerate(files) if i in eval_ids]


def _joined_len(files: list[_File]) -> int:
    return sum(len(f.data) for f in files) + max(len(files) - 1, 0) * len(SEPARATOR)


def _join(files: list[_File]) -> ByteSeq:
    """The files joined by SEPARATOR, as a ByteSeq that copies no mapped file.

    Each run of in-memory files (with the separators in and around it) is copied into one
    array, so a corpus of small files is a single part and `windows` is one gather; a mapped
    file is a part of its own.
    """
    parts: list[np.ndarray] = []
    run: list[np.ndarray] = []
    for i, file in enumerate(files):
        if i:
            run.append(_SEPARATOR_ARRAY)
        if isinstance(file.data, np.memmap):
            if run:
                parts.append(np.concatenate(run))
                run = []
            parts.append(file.data)
        else:
            run.append(file.data)
    if run:
        parts.append(np.concatenate(run))
    return ByteSeq(parts)


@dataclass(slots=True)
class Corpus:
    """The loaded text: train and eval bytes (read-only ByteSeqs) and which files went where."""

    train: ByteSeq
    """Train bytes, files in sorted order joined by SEPARATOR (`.tensor()` copies them into memory)."""
    eval: ByteSeq
    """Held-out eval bytes, same layout."""
    train_files: list[str]
    """Relative names of the files in train, in order."""
    eval_files: list[str]
    """Relative names of the files in eval, in order (a single file's tail is named 'NAME#tail')."""
    source: str
    """Where the text came from, for logs: 'stdlib:DIR' or the user's paths."""

    @classmethod
    def load(cls, config: DataConfig) -> Corpus:
        """Read (small files) or memory-map (large ones) and split the corpus that `config` names.

        Args:
            config: paths (empty = built-in stdlib corpus), eval_fraction, max_bytes, and the
                window and batch sizes the data must cover.

        Returns:
            The corpus, deterministic for the same files and config.

        Raises:
            ValueError: a path does not exist or cannot be read, or there is less text than one
                training batch plus one eval window needs.
        """
        if config.paths:
            files, source = _capped(_user_files(config.paths), config.max_bytes), " ".join(config.paths)
        else:
            files, source = _capped(_stdlib_files(), config.max_bytes), f"stdlib:{stdlib_root()}"
        files = [f for f in files if len(f.data)]
        in_memory = sum(len(f.data) for f in files if not isinstance(f.data, np.memmap))
        if in_memory > _WARN_IN_MEMORY_BYTES:
            log.warning(
                "%s: %.1f GiB of files under %d MiB are read into memory (briefly twice that while loading), "
                "where larger files would be memory-mapped; to use less memory, join the small files into "
                "files of %d MiB or more (e.g. with cat)",
                source, in_memory / (1 << 30), _MAP_MIN_BYTES // _MiB, _MAP_MIN_BYTES // _MiB,
            )
        need = config.batch_size * config.window + config.window
        total = sum(len(f.data) for f in files)
        if total < need:
            raise ValueError(
                f"too little text in {source}: {total} bytes, but one batch of "
                f"data.batch_size x (data.seq_len + 1) = {config.batch_size} x {config.window} bytes plus one "
                f"eval window need {need}; add more text, raise data.max_bytes, or lower data.seq_len / data.batch_size"
            )
        train, held = _split(files, config)
        corpus = cls(
            train=_join(train),
            eval=_join(held),
            train_files=[f.name for f in train],
            eval_files=[f.name for f in held],
            source=source,
        )
        if len(corpus.eval) < config.window:
            raise ValueError(
                f"the held-out files hold {len(corpus.eval)} bytes, fewer than one eval window of "
                f"data.seq_len + 1 = {config.window}; add more or longer files or lower data.seq_len"
            )
        if len(corpus.train) < config.batch_size * config.window:
            raise ValueError(
                f"after holding out {len(corpus.eval)} eval bytes only {len(corpus.train)} train bytes remain, "
                f"fewer than one batch ({config.batch_size} x {config.window}); add more text or lower "
                "data.eval_fraction, data.seq_len or data.batch_size"
            )
        return corpus

    def shard(self, index: int, count: int) -> ByteSeq:
        """Peer `index` of `count`'s contiguous slice of the train bytes (a view, no copy).

        Shards are disjoint, differ in length by at most one byte, and together are exactly the
        train set in order.

        Args:
            index: this peer's shard, 0 <= index < count.
            count: number of shards.

        Returns:
            train[index * n // count : (index + 1) * n // count], a ByteSeq view.

        Raises:
            ValueError: index or count out of range.
        """
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard index must satisfy 0 <= index < count, got index={index}, count={count}")
        n = len(self.train)
        return self.train[index * n // count : (index + 1) * n // count]


def _peer_seed(seed: int, peer: int) -> int:
    # Hash rather than add: seed + peer would give peer 1 of seed 0 the stream of peer 0 of seed 1.
    digest = hashlib.blake2b(f"{seed}:{peer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _windows(data: ByteSeq | torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows data[s : s + len(offsets)] for the starts s ([n, 1]), in data's dtype."""
    if isinstance(data, ByteSeq):
        return data.windows(starts, len(offsets))
    return data[starts + offsets]


def _check_fits(data: ByteSeq | torch.Tensor, seq_len: int, what: str) -> None:
    size = len(data) if isinstance(data, ByteSeq) else data.numel()
    if (isinstance(data, torch.Tensor) and data.ndim != 1) or size < seq_len + 1:
        raise ValueError(
            f"{what} has {size} bytes, fewer than one window of data.seq_len + 1 = {seq_len + 1}; "
            "use fewer peers, more text or a smaller data.seq_len"
        )


class Batches:
    """Endless random windows of a byte sequence: each `next()` is a LongTensor [batch_size, seq_len + 1].

    The draws come from a private generator seeded by (seed, peer), so the stream is the same
    on every run and different for every peer; `state_dict` lets a restarted peer continue it.
    """

    def __init__(
        self, data: ByteSeq | torch.Tensor, *, seq_len: int, batch_size: int, seed: int = 0, peer: int = 0
    ) -> None:
        """Sample windows of `data`.

        Args:
            data: a ByteSeq, e.g. `corpus.shard(peer, count)`, or a 1-D uint8 tensor.
            seq_len: context bytes per window.
            batch_size: windows per batch.
            seed: the run's data seed.
            peer: this peer's index, mixed into the seed.

        Raises:
            ValueError: data is shorter than one window.
        """
        _check_fits(data, seq_len, "the data shard")
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.step = 0
        self._generator = torch.Generator(device="cpu").manual_seed(_peer_seed(seed, peer))
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size, 1), generator=self._generator)
        self.step += 1
        # Gather in uint8 (8x less memory traffic), widen only the result.
        return _windows(self.data, starts, self._offsets).long()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: generator state and number of batches drawn."""
        return {"generator": self._generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` taken from a Batches over the same data.

        Raises:
            ValueError: the state lacks 'generator' or 'step'.
        """
        missing = {"generator", "step"} - state.keys()
        if missing:
            raise ValueError(f"Batches state is missing {sorted(missing)}; pass what Batches.state_dict() returned")
        self._generator.set_state(state["generator"])
        self.step = int(state["step"])


def evaluate(
    model: ByteLM,
    data: ByteSeq | torch.Tensor,
    *,
    seq_len: int,
    batch_size: int,
    batches: int,
    device: torch.device | str,
) -> float:
    """Mean next-byte loss (nats) over fixed, evenly spaced windows of `data`.

    The windows depend only on len(data), seq_len, batch_size and batches, so every call (on
    every peer) scores the same bytes and the numbers are comparable over a run.

    Args:
        model: the model to score; put in eval mode for the call, its mode restored after.
        data: a ByteSeq, usually `corpus.eval`, or a 1-D uint8 tensor.
        seq_len: context bytes per window.
        batch_size: windows per forward pass.
        batches: forward passes; batch_size * batches windows in all.
        device: where the model is.

    Returns:
        The mean loss over all windows.

    Raises:
        ValueError: data is shorter than one window, or batches < 1.
    """
    _check_fits(data, seq_len, "the eval set")
    if batches < 1:
        raise ValueError(f"evaluate needs batches >= 1, got {batches}")
    count = batch_size * batches
    starts = torch.linspace(0, len(data) - seq_len - 1, count).long().view(batches, batch_size, 1)
    offsets = torch.arange(seq_len + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for batch_starts in starts:
                total += model.loss(_windows(data, batch_starts, offsets).long().to(device)).item()
    finally:
        model.train(was_training)
    # Every batch has the same number of targets, so the mean of batch means is the mean per byte.
    return total / batches
