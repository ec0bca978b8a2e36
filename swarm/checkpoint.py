"""Checkpoints: a peer's committed state on disk, written atomically and verified when read.

A checkpoint is one folder `round-00000042/` inside the checkpoint directory:

* `state.safetensors`: the tensors (θ_global, the outer momentum, error-feedback residuals, the inner
  optimizer's moments, the data sampler's generator), by name;
* `manifest.json`: the run id, the round, the committed state hash, the model's settings, the data
  position, and each file's size and XXH3-128 digest.

It is written into a hidden `.tmp-round-...` folder, flushed to disk, then renamed into place: a
reader sees a whole checkpoint or none, and a crash mid-write leaves only a temporary folder, which
the next writer of the same directory removes. Reading checks the manifest, every file's size and
digest before loading a tensor, so a truncated or corrupt checkpoint is refused with the reason, and
`newest` falls back to the previous one. Only folders this module made (`round-N` with a manifest,
`.tmp-round-...`) are ever removed: other files in the directory are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

log = logging.getLogger("swarm.checkpoint")

FORMAT = 1
"""The manifest's `format`; a reader refuses another."""
MANIFEST = "manifest.json"
TENSORS = "state.safetensors"
_NAME = re.compile(r"^round-(\d{8,})$")
_TMP_PREFIX = ".tmp-round-"
_MAX_MANIFEST_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the folder and the reason."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often a peer saves its committed state."""

    dir: str = ""
    """Folder of this peer's checkpoints ("": none are written). A peer started with it loads its newest valid
    checkpoint before joining (a newer state held by the run's live members replaces it at the join), so a run
    every peer of which stopped resumes where it was."""
    every: int = 10
    """Write one every this many committed rounds."""
    keep: int = 3
    """Keep the newest this many; older ones are removed (0: keep all)."""
    resume: str = ""
    """Resume from this checkpoint (a round-N folder) or the newest valid one in this folder; refused when there is
    none ("": from `dir` when it holds one, else from the run's live members)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 0:
            raise ValueError(f"checkpoint.every must be >= 1 and checkpoint.keep >= 0, got {self.every}, {self.keep}")


@dataclass(slots=True)
class Checkpoint:
    """One checkpoint read back: its folder, manifest and tensors (numpy arrays, by name)."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def hash(self) -> str:
        return str(self.manifest["hash"])

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush `path` (a file or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_name(round_: int) -> str:
    return f"round-{round_:08d}"


def write(folder: str | Path, *, run_id: str, round_: int, state_hash: str,
          tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> Path:
    """Write one checkpoint of round `round_` into `folder` atomically; returns its path.

    Args:
        tensors: name -> array (contiguous, any dtype safetensors takes).
        meta: JSON-serialisable facts saved in the manifest (model settings, data position, ...).
    Raises:
        CheckpointError: that round's checkpoint exists with another hash (it is never overwritten), or
            the folder cannot be written (the message says why; nothing half-written is left in place).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    folder = Path(folder)
    final = folder / folder_name(round_)
    if final.exists():
        try:
            existing = read_manifest(final)
        except CheckpointError:
            existing = {}
        if existing.get("hash") == state_hash and existing.get("run_id") == run_id:
            return final  # the same state: already on disk
        raise CheckpointError(f"{final} exists and holds another state ({str(existing.get('hash', '?'))[:12]}, not "
                              f"{state_hash[:12]}); not overwriting it: move it away or use another --checkpoint-dir")
    tmp = folder / f"{_TMP_PREFIX}{round_:08d}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        arrays = {k: np.require(v, requirements='C') for k, v in tensors.items()}  # (0-d arrays stay 0-d)
        save_file(arrays, tmp / TENSORS)
        files = {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size, "xxh3_128": _file_digest(tmp / TENSORS)}}
        manifest = {"format": FORMAT, "run_id": run_id, "round": int(round_), "hash": state_hash,
                    "created_at": time.time(), "files": files, **(meta or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for name in (TENSORS, MANIFEST):
            fsync_path(tmp / name)
        os.rename(tmp, final)
        fsync_path(folder)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write a checkpoint into {folder}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint in `path`, checked for the fields every reader needs.

    Raises:
        CheckpointError: no manifest, not JSON, another format, or a field missing.
    """
    path = Path(path)
    file = path / MANIFEST
    try:
        if file.stat().st_size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{file} is larger than {_MAX_MANIFEST_BYTES} bytes: not a swarm manifest")
        manifest = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is not a swarm checkpoint: it has no {MANIFEST}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a format-{FORMAT} swarm manifest")
    for key, kind in (("run_id", str), ("round", int), ("hash", str), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{file} lacks {key!r} ({kind.__name__})")
    return manifest


def read(path: str | Path, *, run_id: str | None = None) -> Checkpoint:
    """Read and verify the checkpoint in `path` (a `round-N` folder).

    Args:
        run_id: refuse a checkpoint of another run (None: any).
    Raises:
        CheckpointError: missing, truncated, corrupt, or of another run (the message says which file and why).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if run_id is not None and manifest["run_id"] != run_id:
        raise CheckpointError(f"{path} belongs to run {manifest['run_id']!r}, not {run_id!r}")
    for name, info in manifest["files"].items():
        file = path / name
        if "/" in name or not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {info.get('bytes')}: truncated?")
        if _file_digest(file) != info.get("xxh3_128"):
            raise CheckpointError(f"{file} does not match the digest in its manifest: corrupt")
    try:
        tensors = load_file(path / TENSORS) if TENSORS in manifest["files"] else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / TENSORS} cannot be loaded: {e}") from e
    return Checkpoint(path, manifest, tensors)


def rounds(folder: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of the checkpoint folders in `folder`, oldest first (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def candidates(folder: str | Path, *, run_id: str | None = None) -> Iterator[Checkpoint]:
    """The valid checkpoints of `folder`, newest first; each one that fails its checks is logged and skipped."""
    for _, path in reversed(rounds(folder)):
        try:
            yield read(path, run_id=run_id)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)


def newest(folder: str | Path, *, run_id: str | None = None,
           accept: Callable[[Checkpoint], bool] = lambda c: True) -> Checkpoint | None:
    """The newest valid checkpoint of `folder` that `accept` takes (a corrupt one falls back to the previous)."""
    return next((c for c in candidates(folder, run_id=run_id) if accept(c)), None)


def find(source: str | Path, *, run_id: str | None = None) -> Checkpoint | None:
    """The checkpoint `source` names: the folder itself when it is one (its errors raised), else the newest valid
    checkpoint inside it (None: none there).

    Raises:
        CheckpointError: `source` is a checkpoint folder that fails its checks.
    """
    source = Path(source)
    if (source / MANIFEST).exists():
        return read(source, run_id=run_id)
    return newest(source, run_id=run_id)


def prune(folder: str | Path, keep: int, run_id: str) -> list[Path]:
    """Remove all but the newest `keep` checkpoints of run `run_id` (0: none removed), and dead writers'
    temporary folders. Other runs' checkpoints and anything this module did not write are left alone.

    Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if keep > 0:
        ours = []
        for _, path in rounds(folder):
            try:
                if read_manifest(path)["run_id"] == run_id:
                    ours.append(path)
            except CheckpointError:
                continue  # not a whole checkpoint of ours: not ours to remove
        for path in ours[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir() and not _writer_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class Checkpointer:
    """Writes a peer's checkpoints in a background thread, one at a time, and prunes after each.

    `save` takes arrays the caller will not change (copies), so training goes on while they are
    written; a save while the previous one is still being written waits for it. A failed write
    (disk full, permissions) is logged and kept in `errors`; training is not stopped by it.
    """

    def __init__(self, config: CheckpointConfig, run_id: str,
                 on_written: Callable[[int], None] | None = None) -> None:
        """Args:
            on_written: called (in the writer thread) with the round of each checkpoint once it is on disk.
        """
        import concurrent.futures

        self.config = config
        self.on_written = on_written
        self.run_id = run_id
        self.last_round = -1
        """The newest round saved (or being saved); -1: none."""
        self.written: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-checkpoint")
        self._pending: concurrent.futures.Future[None] | None = None

    def due(self, round_: int) -> bool:
        """Whether the committed state of `round_` should be written now (every `config.every` rounds)."""
        return round_ >= 0 and (round_ + 1) % self.config.every == 0 and round_ > self.last_round

    def save(self, round_: int, state_hash: str, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Write the state of `round_` in the background (after the previous write finished)."""
        self.wait()
        self.last_round = round_
        self._pending = self._pool.submit(self._write, round_, state_hash, dict(tensors), dict(meta))

    def _write(self, round_: int, state_hash: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        started = time.perf_counter()
        path = write(self.config.dir, run_id=self.run_id, round_=round_, state_hash=state_hash, tensors=tensors,
                     meta=meta)
        prune(self.config.dir, self.config.keep, self.run_id)
        took = time.perf_counter() - started
        self.written.append({"round": round_, "path": str(path), "write_s": round(took, 3)})
        if self.on_written is not None:
            self.on_written(round_)
        log.info("checkpoint of round %d (hash %s) written to %s in %.2f s", round_, state_hash[:12], path, took)

    def wait(self) -> None:
        """Wait for the write in progress, if any; its failure is logged and kept in `errors`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except (CheckpointError, OSError) as e:
            log.error("checkpoint not written: %s", e)
            self.errors.append(str(e))

    def close(self) -> None:
        """Finish the write in progress and stop the writer thread."""
        self.wait()
        self._pool.shutdown(wait=True)


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary folder (…-PID-RANDOM) still runs."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
