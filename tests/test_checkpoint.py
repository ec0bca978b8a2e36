"""swarm.checkpoint and swarm.diloco.saving: atomic writes, refusal of truncated, corrupt and foreign checkpoints
with the previous one used instead, pruning that touches only its own run's folders, and a DiLoCo state that
comes back on the same hash with its optimizer and residual."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm import checkpoint as ck
from swarm.diloco import DiLoCo, LocalGroup, checkpoint_of, restore
from swarm.task import build_model


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"global.theta": rng.standard_normal(1000, dtype=np.float32), "step": np.array(3.0, np.float32),
            "gen": rng.integers(0, 255, 16, dtype=np.uint8)}


def test_a_written_checkpoint_reads_back_the_same_arrays_and_manifest(tmp_path: Path) -> None:
    t = _tensors()
    path = ck.write(tmp_path, run_id="r", round_=7, state_hash="h7", tensors=t, meta={"model": "tiny"})
    assert path.name == "round-00000007" and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    got = ck.read(path, run_id="r")
    assert (got.round, got.hash, got.run_id, got.manifest["model"]) == (7, "h7", "r", "tiny")
    assert set(got.tensors) == set(t) and all(np.array_equal(got.tensors[k], t[k]) for k in t)
    # The same state again is a no-op; another state for the same round is never written over it.
    assert ck.write(tmp_path, run_id="r", round_=7, state_hash="h7", tensors=t) == path
    with pytest.raises(ck.CheckpointError, match="holds another state"):
        ck.write(tmp_path, run_id="r", round_=7, state_hash="other", tensors=t)
    with pytest.raises(ck.CheckpointError, match="belongs to run 'r', not 'x'"):
        ck.read(path, run_id="x")


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_a_damaged_checkpoint_is_refused_with_the_reason_and_the_previous_one_is_used(tmp_path: Path,
                                                                                       damage: str) -> None:
    ck.write(tmp_path, run_id="r", round_=1, state_hash="h1", tensors=_tensors(1))
    bad = ck.write(tmp_path, run_id="r", round_=2, state_hash="h2", tensors=_tensors(2))
    data = bad / ck.TENSORS
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
        why = "truncated"
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
        why = "corrupt"
    elif damage == "manifest":
        (bad / ck.MANIFEST).write_text("{not json")
        why = "cannot be read"
    else:
        data.unlink()
        why = "missing"
    with pytest.raises(ck.CheckpointError, match=why):
        ck.read(bad)
    best = ck.newest(tmp_path, run_id="r")
    assert best is not None and best.round == 1 and best.hash == "h1"


def test_newest_skips_other_runs_and_what_accept_refuses(tmp_path: Path) -> None:
    ck.write(tmp_path, run_id="r", round_=3, state_hash="a", tensors=_tensors())
    ck.write(tmp_path, run_id="other", round_=9, state_hash="b", tensors=_tensors())
    assert ck.newest(tmp_path, run_id="r").round == 3
    assert ck.newest(tmp_path).round == 9
    assert ck.newest(tmp_path, accept=lambda c: c.hash == "a").round == 3
    assert ck.newest(tmp_path / "nothing-here") is None


def test_prune_keeps_the_newest_of_its_run_and_leaves_everything_else_alone(tmp_path: Path) -> None:
    for r in range(5):
        ck.write(tmp_path, run_id="r", round_=r, state_hash=f"h{r}", tensors=_tensors(r))
    ck.write(tmp_path, run_id="other", round_=0 + 100, state_hash="x", tensors=_tensors())
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "round-00000050").mkdir()  # looks like ours but has no manifest: not ours
    dead = tmp_path / ".tmp-round-00000009-999999999-abcd"  # a writer that died mid-write
    dead.mkdir()
    removed = ck.prune(tmp_path, 2, "r")
    assert sorted(p.name for p in removed) == [dead.name, "round-00000000", "round-00000001", "round-00000002"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["notes.txt", "round-00000003", "round-00000004", "round-00000050", "round-00000100"]


def test_a_write_that_fails_leaves_nothing_in_place(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="Unknown dtype"):
        ck.write(tmp_path, run_id="r", round_=1, state_hash="h", tensors={"x": np.array([object()])})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ck.CheckpointError, match="cannot write"):
        ck.write(tmp_path / "file", run_id="r", round_=1, state_hash="h", tensors=_tensors())


def test_checkpointer_writes_in_the_background_every_n_rounds_and_prunes(tmp_path: Path) -> None:
    saver = ck.Checkpointer(ck.CheckpointConfig(dir=str(tmp_path), every=2, keep=2), "r")
    for r in range(8):
        if saver.due(r):
            saver.save(r, f"h{r}", _tensors(r), {})
    saver.close()
    assert [w["round"] for w in saver.written] == [1, 3, 5, 7] and not saver.errors
    assert [r for r, _ in ck.rounds(tmp_path)] == [5, 7]


def _diloco(seed: int = 0) -> tuple[DiLoCo, torch.optim.Optimizer, torch.nn.Module]:
    model = build_model("tiny", seed=seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return DiLoCo(model, inner, peer=LocalGroup(1).member(0), sync_every=4, codec="sparseloco"), inner, model


def test_a_diloco_state_restores_to_the_same_hash_with_its_optimizer_and_residual(tmp_path: Path) -> None:
    dl, inner, model = _diloco()
    batch = torch.randint(0, 256, (2, 33))
    model.loss(batch).backward()
    inner.step()
    dl.state.propose(torch.full((dl.numel,), 1e-3), 0)
    dl.state.adopt(0)
    dl.feedback.residual = torch.randn(dl.numel)
    tensors, meta = checkpoint_of(dl, inner)
    path = ck.write(tmp_path, run_id="r", round_=0, state_hash=dl.state.digest, tensors=tensors, meta=meta)

    dl2, inner2, model2 = _diloco(seed=1)  # other initial weights: the checkpoint must replace them
    restore(dl2, inner2, ck.read(path))
    assert dl2.state.digest == dl.state.digest and dl2.state.round == 0
    assert torch.equal(dl2.feedback.residual, dl.feedback.residual)
    a, b = inner.state_dict()["state"], inner2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    with dl2:  # entering loads θ_global into the model
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model2.parameters()]), dl.state.theta)


def test_restore_refuses_a_state_that_is_not_its_manifests_hash_or_another_model(tmp_path: Path) -> None:
    dl, inner, _ = _diloco()
    dl.state.propose(torch.zeros(dl.numel), 0)
    dl.state.adopt(0)
    tensors, meta = checkpoint_of(dl, inner)
    path = ck.write(tmp_path, run_id="r", round_=0, state_hash="f" * 32, tensors=tensors, meta=meta)
    fresh, inner2, _ = _diloco()
    before = fresh.state.digest
    with pytest.raises(ck.CheckpointError, match="hashes to"):
        restore(fresh, inner2, ck.read(path))
    assert fresh.state.digest == before and fresh.state.round == -1  # nothing changed
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["numel"] = 12
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match="parameters"):
        restore(fresh, inner2, ck.read(path))
