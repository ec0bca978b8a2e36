"""`--data` tokenized with a model's tokenizer: text files, JSONL and Parquet, memory-mapped token ids.

Documents: a text file is one; a JSONL file (`.jsonl`, `.ndjson`) one per line, its `data.text_field` string;
a Parquet file (`.parquet`, needs `pyarrow`) one per row of that column. Without `--data`, the built-in
corpus (the standard library's `.py` files). Each document goes to the eval set when a hash of its file
name and index falls under `data.eval_fraction` (so adding files moves nothing), else to the train set;
documents are tokenized in batches as they are read (streamed: nothing holds the whole text) and joined
with the tokenizer's end-of-text id.

The token ids are written once into `data.cache_dir` (default `~/.cache/swarm/tokens`), into a folder
named by a hash of the tokenizer and every file's name, size and modification time, then renamed into
place; every later load (every peer of the machine, every restart) memory-maps them: no size cap, and
only the windows drawn are read from disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swarm.task.data import DataConfig, _eval_score, _looks_binary, _read, _walk, stdlib_root

log = logging.getLogger("swarm.task")

FORMAT = 1
_BATCH_DOCS = 256
_JSONL = (".jsonl", ".ndjson")


@dataclass(slots=True)
class TokenCorpus:
    """Train and eval token ids (1-D int32 tensors over memory-mapped files), as `Corpus` holds bytes."""

    train: torch.Tensor
    eval: torch.Tensor
    source: str
    documents: int
    folder: Path
    """The cache folder the ids live in."""

    @classmethod
    def load(cls, config: DataConfig, tokenizer: Any) -> TokenCorpus:
        """Tokenize (once) and memory-map the documents `config` names.

        Raises:
            ValueError: a path is missing, a JSONL line is not JSON or lacks the text field, Parquet without
                pyarrow, or too few tokens for one batch and one eval window.
        """
        files = _files(config.paths)
        source = " ".join(config.paths) if config.paths else f"stdlib:{stdlib_root()}"
        root = Path(config.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm" / "tokens")
        key = _key(files, tokenizer, config)
        folder = root / key
        if not (folder / "meta.json").is_file():
            _tokenize(files, tokenizer, config, folder)
        meta = json.loads((folder / "meta.json").read_text())
        train, held = (_map(folder / f"{part}.bin", meta[part]) for part in ("train", "eval"))
        need = config.batch_size * config.window
        if len(train) < need or len(held) < config.window:
            raise ValueError(f"too little text in {source}: {len(train)} train and {len(held)} eval tokens, but one "
                             f"batch needs {need} and one eval window {config.window}; add more text or lower "
                             "data.seq_len / data.batch_size / raise data.eval_fraction")
        return cls(train, held, source, int(meta["documents"]), folder)

    def shard(self, index: int, count: int) -> torch.Tensor:
        """Peer `index` of `count`'s contiguous slice of the train tokens (a view)."""
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard index must satisfy 0 <= index < count, got index={index}, count={count}")
        n = len(self.train)
        return self.train[index * n // count : (index + 1) * n // count]


def _files(paths: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of every document file `paths` names, sorted; the built-in corpus when empty."""
    if not paths:
        return [(n, p) for n, p in _walk(stdlib_root(), frozenset({"test", "tests", "idlelib", "__pycache__",
                                                                   "site-packages"})) if n.endswith(".py")]
    found: list[tuple[str, Path]] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            path = path.resolve()
            found += [(f"{path.name}/{n}", p) for n, p in _walk(path, frozenset({"__pycache__"}))]
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise ValueError(f"data path {arg!r} does not exist; pass existing files or directories to --data")
    return found


def _key(files: list[tuple[str, Path]], tokenizer: Any, config: DataConfig) -> str:
    h = hashlib.sha256(json.dumps({
        "format": FORMAT, "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                                        len(tokenizer), tokenizer.eos_token_id],
        "vocab": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
        "eval_fraction": config.eval_fraction, "max_bytes": config.max_bytes, "text_field": config.text_field,
        "files": [(n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in files],
    }).encode())
    return h.hexdigest()[:32]


def _documents(files: list[tuple[str, Path]], field: str) -> Iterator[tuple[str, str]]:
    """(file name, text) of every document, in order."""
    for name, path in files:
        if path.suffix == ".parquet":
            yield from ((name, text) for text in _parquet(path, field))
        elif path.suffix in _JSONL:
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
                    text = record.get(field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{number}: no string field {field!r} (set data.text_field)")  # noqa: TRY004
                    yield name, text
        else:
            data = _read(path)
            if data is not None and len(data) and not _looks_binary(data):
                yield name, bytes(data).decode("utf-8", errors="replace")


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'swarm-train[data]'") from e
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)}; "
                         "set data.text_field)")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


def _tokenize(files: list[tuple[str, Path]], tokenizer: Any, config: DataConfig, folder: Path) -> None:
    """Tokenize every document into folder/{train,eval}.bin (int32) and meta.json, written then renamed."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the model's tokenizer has no end-of-text (eos) token to put between documents")
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    counts = {"train": 0, "eval": 0}
    documents, chars = 0, 0
    log.info("tokenizing %d files into %s (once: later loads map it)", len(files), folder)
    try:
        with open(tmp / "train.bin", "wb") as train, open(tmp / "eval.bin", "wb") as held:
            out = {"train": train, "eval": held}
            pending: dict[str, list[str]] = {"train": [], "eval": []}

            def flush(part: str) -> None:
                if not pending[part]:
                    return
                ids = tokenizer(pending[part], add_special_tokens=False)["input_ids"]
                flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
                out[part].write(flat.tobytes())
                counts[part] += len(flat)
                pending[part] = []

            for index, (name, text) in enumerate(_documents(files, config.text_field)):
                part = "eval" if _eval_score(f"{name}#{index}") < config.eval_fraction else "train"
                pending[part].append(text)
                documents, chars = documents + 1, chars + len(text)
                if len(pending[part]) >= _BATCH_DOCS:
                    flush(part)
                if config.max_bytes and chars >= config.max_bytes:
                    break
            flush("train")
            flush("eval")
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **counts, "documents": documents, "chars": chars}))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # another peer of this machine finished first: use its
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenized %d documents: %d train and %d eval tokens", documents, counts["train"], counts["eval"])


def _map(path: Path, count: int) -> torch.Tensor:
    if count == 0:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.memmap(path, dtype=np.int32, mode="c", shape=(count,)))
