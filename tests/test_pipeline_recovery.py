"""swarm.pipeline: stage split, the out-of-order schedule, CheckFree(+) and baseline recoveries, and the repro script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm.pipeline import (
    RecoveryConfig,
    SnapshotStore,
    block_order,
    checkfree_weights,
    pipeline_forward,
    recover,
    split_stages,
    stage_forward,
    stage_state,
    swap_partner,
)
from swarm.pipeline.recovery import fresh_stage_weights
from swarm.pipeline.stages import StageLayout, clone_state, load_stage_state, stage_parameters
from swarm.task import ByteLM, ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = ModelConfig(dim=16, n_layers=6, n_heads=2, ffn_hidden=24, max_seq_len=16)


@pytest.fixture
def model() -> ByteLM:
    return build_model(CONFIG, seed=0)


# ------------------------------------------------------------------ stages


@pytest.mark.parametrize("n_stages", [1, 2, 3, 6])
def test_split_covers_every_parameter_once_with_identical_block_shapes(model: ByteLM, n_stages: int) -> None:
    layout = split_stages(model, n_stages)
    seen: list[int] = []
    for s in range(n_stages):
        seen += [id(p) for p in stage_parameters(model, layout, s).values()]
    assert len(seen) == len(set(seen)), "a parameter belongs to two stages"
    assert set(seen) == {id(p) for p in model.parameters()}, "a parameter belongs to no stage"
    shapes = [{k: v.shape for k, v in stage_state(model, layout, s, blocks_only=True).items()} for s in range(n_stages)]
    assert all(s == shapes[0] for s in shapes)
    assert "embed.weight" in stage_state(model, layout, 0)
    assert {"norm.weight", "head.weight"} <= stage_state(model, layout, n_stages - 1).keys()
    if n_stages > 2:
        assert all(k.startswith("blocks.") for k in stage_state(model, layout, 1))


def test_split_refuses_uneven_stages(model: ByteLM) -> None:
    with pytest.raises(ValueError, match="n_layers"):
        split_stages(model, 4)


def test_stage_forward_in_order_equals_the_model(model: ByteLM) -> None:
    layout = split_stages(model, 3)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = tokens
        for s in range(3):
            x = stage_forward(model, layout, x, s)
        torch.testing.assert_close(x, model(tokens))
        torch.testing.assert_close(pipeline_forward(model, layout, tokens, [0, 1, 2]), model(tokens))
        assert not torch.allclose(pipeline_forward(model, layout, tokens, [1, 0, 2]), model(tokens))
    with pytest.raises(ValueError, match="permutation"):
        pipeline_forward(model, layout, tokens, [0, 0, 2])


def test_load_stage_state_round_trip_and_checks(model: ByteLM) -> None:
    layout = split_stages(model, 3)
    saved = clone_state(stage_state(model, layout, 1))
    load_stage_state(model, layout, 1, {k: torch.zeros_like(v) for k, v in saved.items()})
    assert all(float(v.abs().sum()) == 0 for v in stage_state(model, layout, 1).values())
    load_stage_state(model, layout, 1, saved)
    for k, v in stage_state(model, layout, 1).items():
        torch.testing.assert_close(v, saved[k])
    with pytest.raises(ValueError, match="unknown keys"):
        load_stage_state(model, layout, 1, {**saved, "embed.weight": torch.zeros(256, 16)})
    with pytest.raises(ValueError, match="missing block keys"):
        load_stage_state(model, layout, 1, {})


# ------------------------------------------------------------------ schedule


def test_block_order_swaps_first_and_last_pairs_on_odd_microbatches() -> None:
    assert block_order(6, 0, swap=True) == [0, 1, 2, 3, 4, 5]
    assert block_order(6, 1, swap=True) == [1, 0, 2, 3, 5, 4]
    assert block_order(6, 2, swap=True) == [0, 1, 2, 3, 4, 5]
    assert block_order(6, 7, swap=True) == [1, 0, 2, 3, 5, 4]
    assert block_order(4, 1, swap=True) == [1, 0, 3, 2]
    assert block_order(5, 3, swap=True) == [1, 0, 2, 4, 3]
    assert block_order(2, 1, swap=True) == [1, 0]
    assert block_order(2, 0, swap=True) == [0, 1]
    assert block_order(1, 1, swap=True) == [0]
    for n in (1, 2, 3, 4, 6):
        for mb in range(4):
            assert block_order(n, mb, swap=False) == list(range(n))
    with pytest.raises(ValueError, match="3 block stages|at least 4"):
        block_order(3, 1, swap=True)
    with pytest.raises(ValueError):
        block_order(0, 0, swap=False)
    with pytest.raises(ValueError):
        block_order(4, -1, swap=True)


def test_swap_partners() -> None:
    assert [swap_partner(s, 6) for s in range(6)] == [1, 0, None, None, 5, 4]
    assert [swap_partner(s, 4) for s in range(4)] == [1, 0, 3, 2]
    assert [swap_partner(s, 2) for s in range(2)] == [1, 0]
    assert swap_partner(0, 1) is None


# ------------------------------------------------------------------ recovery formula


def test_checkfree_weights_against_hand_computation() -> None:
    prev = {"w": torch.tensor([1.0, 2.0, -4.0]), "v": torch.tensor([[0.0, 10.0]])}
    nxt = {"w": torch.tensor([3.0, 0.0, 8.0]), "v": torch.tensor([[6.0, -2.0]])}
    # a = ||g_{i+1}|| = 3 weighs W_{i+1}, b = ||g_{i-1}|| = 1 weighs W_{i-1}: W = (3 * next + 1 * prev) / 4.
    out = checkfree_weights(prev, nxt, grad_norm_prev=1.0, grad_norm_next=3.0)
    torch.testing.assert_close(out["w"], torch.tensor([(9 + 1) / 4, (0 + 2) / 4, (24 - 4) / 4]))
    torch.testing.assert_close(out["v"], torch.tensor([[(18 + 0) / 4, (-6 + 10) / 4]]))
    # The larger-norm neighbour dominates: swapping the norms moves the result towards prev.
    swapped = checkfree_weights(prev, nxt, grad_norm_prev=3.0, grad_norm_next=1.0)
    torch.testing.assert_close(swapped["w"], torch.tensor([(3 + 3) / 4, (0 + 6) / 4, (8 - 12) / 4]))
    assert out["w"].data_ptr() not in (prev["w"].data_ptr(), nxt["w"].data_ptr())


def test_checkfree_weights_equal_norms_collapse_to_plain_average() -> None:
    g = torch.Generator().manual_seed(0)
    prev = {"w": torch.randn(5, 7, generator=g)}
    nxt = {"w": torch.randn(5, 7, generator=g)}
    mean = (prev["w"] + nxt["w"]) / 2
    for norm in (1.0, 0.25, 37.0, 0.0):
        torch.testing.assert_close(checkfree_weights(prev, nxt, norm, norm)["w"], mean)


def test_checkfree_weights_refuses_bad_input() -> None:
    w = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="keys"):
        checkfree_weights(w, {"x": torch.ones(2)}, 1.0, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        checkfree_weights(w, {"w": torch.ones(3)}, 1.0, 1.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="grad_norm"):
            checkfree_weights(w, w, bad, 1.0)


def test_checkfree_weights_keeps_dtype() -> None:
    prev = {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}
    nxt = {"w": torch.tensor([3.0, 5.0], dtype=torch.bfloat16)}
    out = checkfree_weights(prev, nxt, 1.0, 1.0)
    assert out["w"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0], dtype=torch.bfloat16))


# ------------------------------------------------------------------ recover()


def _survivors(model: ByteLM, layout: StageLayout, lost: int) -> dict[int, dict[str, torch.Tensor]]:
    return {s: stage_state(model, layout, s) for s in range(layout.n_stages) if s != lost}


@pytest.mark.parametrize("method", ["checkfree", "checkfree+"])
def test_recover_middle_stage_uses_the_formula(model: ByteLM, method: str) -> None:
    layout = split_stages(model, 6)
    norms = [0.5, 2.0, 9.0, 6.0, 1.0, 1.0]
    rec = recover(RecoveryConfig(method=method), 3, layout, survivors=_survivors(model, layout, 3), grad_norms=norms)
    expected = checkfree_weights(stage_state(model, layout, 2), stage_state(model, layout, 4), 9.0, 1.0)
    assert rec.kind == "average" and rec.weights.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(rec.weights[k], v)
    assert rec.optimizer_state is None and rec.lr_scale == pytest.approx(1.1) and rec.rollback_step is None
    assert rec.transfer_bytes == 2 * sum(v.numel() * 4 for v in expected.values())
    # Stage 1's neighbour 0 also owns the embedding: only blocks are averaged.
    rec1 = recover(RecoveryConfig(method=method), 1, layout, survivors=_survivors(model, layout, 1), grad_norms=norms)
    assert all(k.startswith("blocks.") for k in rec1.weights)
    load_stage_state(model, layout, 1, rec1.weights)


def test_recover_checkfree_plus_copies_the_swap_partner_and_extras(model: ByteLM) -> None:
    layout = split_stages(model, 6)
    config = RecoveryConfig(method="checkfree+", lr_boost=1.3)
    assert config.out_of_order and config.extras_copies(6) == {0: 1, 5: 4}
    embed_copy = {"embed.weight": torch.full((256, 16), 0.5)}
    rec = recover(config, 0, layout, survivors=_survivors(model, layout, 0), grad_norms=[1.0] * 6,
                  extras_copy=embed_copy)
    assert rec.kind == "copy" and rec.lr_scale == pytest.approx(1.3) and rec.optimizer_state is None
    for k, v in stage_state(model, layout, 1).items():
        torch.testing.assert_close(rec.weights[k], v)
    torch.testing.assert_close(rec.weights["embed.weight"], embed_copy["embed.weight"])
    assert rec.weights["embed.weight"].data_ptr() != embed_copy["embed.weight"].data_ptr()
    head_copy = {k: v.clone() + 1 for k, v in stage_state(model, layout, 5).items() if not k.startswith("blocks.")}
    last = recover(config, 5, layout, survivors=_survivors(model, layout, 5), grad_norms=[1.0] * 6,
                   extras_copy=head_copy)
    assert last.weights.keys() == stage_state(model, layout, 5).keys()
    torch.testing.assert_close(last.weights["blocks.0.mlp.down.weight"], model.blocks[4].mlp.down.weight.detach())
    torch.testing.assert_close(last.weights["head.weight"], head_copy["head.weight"])
    load_stage_state(model, layout, 5, last.weights)
    with pytest.raises(ValueError, match="extras_copy"):
        recover(config, 0, layout, survivors=_survivors(model, layout, 0), grad_norms=[1.0] * 6)


def test_recover_plain_checkfree_end_stage_falls_back_to_its_snapshot(model: ByteLM) -> None:
    layout = split_stages(model, 6)
    config = RecoveryConfig(method="checkfree")
    assert config.checkpointed_stages(6) == (0, 5) and not config.out_of_order
    store = SnapshotStore()
    store.save(5, 100, stage_state(model, layout, 5))
    rec = recover(config, 5, layout, survivors=_survivors(model, layout, 5), grad_norms=[1.0] * 6,
                  checkpoint=store.latest(5))
    assert rec.kind == "checkpoint" and rec.optimizer_state is None and rec.lr_scale == pytest.approx(1.1)
    with pytest.raises(ValueError, match="fresh"):
        recover(config, 0, layout, survivors=_survivors(model, layout, 0), grad_norms=[1.0] * 6)


def test_recover_middle_stage_with_a_lost_neighbour_copies_the_other(model: ByteLM) -> None:
    layout = split_stages(model, 6)
    survivors = {s: stage_state(model, layout, s) for s in (0, 1, 4, 5)}  # 2 and 3 lost together
    rec = recover(RecoveryConfig(), 2, layout, survivors=survivors, grad_norms=[1.0] * 6)
    assert rec.kind == "copy"
    torch.testing.assert_close(rec.weights["blocks.0.attn.qkv.weight"], model.blocks[1].attn.qkv.weight.detach())


def test_random_reinit_differs_and_keeps_shapes(model: ByteLM) -> None:
    layout = split_stages(model, 3)
    rec = recover(RecoveryConfig(method="random"), 1, layout, survivors={}, grad_norms=[1.0] * 3,
                  fresh=lambda: fresh_stage_weights(CONFIG, layout, 1, seed=123))
    old = stage_state(model, layout, 1)
    assert rec.kind == "fresh" and rec.weights.keys() == old.keys() and rec.lr_scale == pytest.approx(1.1)
    for k, v in old.items():
        assert rec.weights[k].shape == v.shape
        if v.ndim > 1:
            assert not torch.equal(rec.weights[k], v), k
    with pytest.raises(ValueError, match="fresh"):
        recover(RecoveryConfig(method="random"), 1, layout, survivors={}, grad_norms=[1.0] * 3)


@pytest.mark.parametrize("scope", ["pipeline", "stage"])
def test_checkpoint_restore_returns_the_saved_weights_and_optimizer(model: ByteLM, scope: str) -> None:
    layout = split_stages(model, 3)
    params = list(stage_parameters(model, layout, 1).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    sum(p.sum() for p in params).backward()
    opt.step()
    store = SnapshotStore()
    store.save(1, 40, stage_state(model, layout, 1), opt.state_dict())
    saved = clone_state(stage_state(model, layout, 1))
    with torch.no_grad():  # training goes on after the save: the snapshot must not follow
        for p in params:
            p.add_(1.0)
    opt.step()
    config = RecoveryConfig(method="checkpoint", checkpoint_scope=scope)  # type: ignore[arg-type]
    assert config.checkpointed_stages(3) == (0, 1, 2) and config.checkpoints_optimizer()
    rec = recover(config, 1, layout, survivors={}, grad_norms=[1.0] * 3, checkpoint=store.latest(1))
    assert rec.kind == "checkpoint" and rec.lr_scale == 1.0
    assert rec.rollback_step == (40 if scope == "pipeline" else None)
    for k, v in saved.items():
        torch.testing.assert_close(rec.weights[k], v)
    assert rec.optimizer_state is not None
    assert rec.optimizer_state["state"][0]["step"] == 1  # the state as saved, not after the second step
    assert rec.transfer_bytes == 3 * sum(v.numel() * 4 for v in saved.values()) + 4 * len(saved)
    with pytest.raises(ValueError, match="no checkpoint"):
        recover(config, 1, layout, survivors={}, grad_norms=[1.0] * 3)


def test_recovery_config_checks() -> None:
    with pytest.raises(ValueError, match="recovery.method"):
        RecoveryConfig(method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_boost"):
        RecoveryConfig(lr_boost=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        RecoveryConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="3"):
        RecoveryConfig(method="checkfree+").check_stages(3)


# ------------------------------------------------------------------ repro script


def _repro_module():  # scripts/ is no package: load the script as a module
    spec = importlib.util.spec_from_file_location("repro_checkfree", REPO / "scripts" / "repro_checkfree.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["repro_checkfree"] = module
    spec.loader.exec_module(module)
    return module


def test_pipeline_rollback_replays_bit_identically() -> None:
    # Rolling back twice to one checkpoint must redo the same steps exactly (weights, optimizer moments,
    # data position), so the checkpoint baseline loses time and nothing else.
    rc = _repro_module()
    from swarm.task import Corpus, DataConfig

    cfg = rc.ReproConfig(dim=32, ffn_hidden=88, stages=4, seq_len=32, batch_size=4, steps=40, eval_every=10,
                         checkpoint_every=10, max_bytes=1 << 20, jobs=1)
    corpus = Corpus.load(DataConfig(max_bytes=cfg.max_bytes, seq_len=cfg.seq_len, batch_size=cfg.batch_size))
    sim = rc.PipelineSim(cfg, RecoveryConfig(method="checkpoint", checkpoint_every=10), 0, corpus)
    sim.save_snapshots()

    def steps(n: int) -> list[torch.Tensor]:
        for _ in range(n):
            sim.train_step()
            sim.after_step()
        return [p.detach().clone() for p in sim.model.parameters()]

    steps(13)
    assert sim.fail([2])[0]["steps_lost"] == 3 and sim.progress == 10
    first = steps(2)
    sim.fail([1, 3])
    assert sim.progress == 10
    second = steps(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_repro_checkfree_smoke_json(tmp_path: Path) -> None:
    # No --out, run from an empty folder: the files go to runs/checkfree/ under it, never loose into it.
    cmd = [sys.executable, str(REPO / "scripts" / "repro_checkfree.py"), "--quick", "--json",
           "--steps", "40", "--eval-every", "10", "--stages", "4", "--dim", "32", "--ffn-hidden", "88",
           "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--rates", "0.5",
           "--steps-per-hour", "5", "--checkpoint-every", "10", "--jobs", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    assert (tmp_path / "runs" / "checkfree" / "checkfree.png").stat().st_size > 0
    assert json.loads((tmp_path / "runs" / "checkfree" / "checkfree.json").read_text())["runs"] == report["runs"]
    methods = {r["method"] for r in report["runs"]}
    assert methods == {"none", "none+", "checkfree", "checkfree+", "checkpoint", "checkpoint-stage", "random"}
    schedules = {json.dumps(r["failures"]) for r in report["runs"] if not r["method"].startswith("none")}
    assert len(schedules) == 1 and json.loads(schedules.pop()), "every method must see the same, non-empty schedule"
    for r in report["runs"]:
        for key in ("curve", "final_loss", "steps_to_target", "wall_to_target_s", "failures", "recoveries",
                    "faster_than_checkpoint_pct", "target_loss", "progress", "steps_redone"):
            assert key in r, (r["method"], key)
        assert len(r["curve"]) == 40 // 10 + 1 and all(math.isfinite(c["loss"]) for c in r["curve"])
    by = {r["method"]: r for r in report["runs"]}
    assert by["none"]["steps_to_target"] is not None and by["none"]["recoveries"] == by["none+"]["recoveries"] == []
    assert by["checkpoint"]["steps_redone"] > 0 and by["checkpoint-stage"]["steps_redone"] == 0
    assert {e["kind"] for e in by["checkfree+"]["recoveries"]} <= {"average", "copy", "fresh"}
    assert {row["method"] for row in report["summary"]} == methods


def test_repro_config_device_options_and_time_limit() -> None:
    # --precision bf16 is CUDA-only; a spent --time-limit-s stops a run at its first eval, marked truncated.
    rc = _repro_module()
    with pytest.raises(ValueError, match="--precision bf16 needs --device cuda"):
        rc.ReproConfig(precision="bf16")
    with pytest.raises(ValueError, match="--device"):
        rc.ReproConfig(device="meta")
    assert rc.ReproConfig(device="cuda", precision="bf16").device == "cuda"  # no GPU needed to build (re-scoring)
    cfg = rc.ReproConfig(dim=32, ffn_hidden=88, stages=4, seq_len=32, batch_size=4, steps=40, eval_every=10,
                         eval_batches=1, max_bytes=1 << 20, jobs=1)
    run = rc.run_one(cfg, "none", 0.0, 0, deadline=0.0)
    assert run["truncated"] and run["executed_steps"] == 10 and [c["step"] for c in run["curve"]] == [0, 10]


def test_truncated_runs_are_scored_to_the_step_all_reached() -> None:
    rc = _repro_module()

    def run(last: int, truncated: bool) -> dict:
        curve = [{"step": s, "progress": s, "io_s": 0.0, "loss": 3.0 - s / 100} for s in range(0, last + 1, 10)]
        return {"curve": curve, "failures": [[15, 1], [last - 5, 2]], "recoveries": [{"step": last - 5}],
                "final_loss": curve[-1]["loss"], "executed_steps": last, "progress": last, "steps_redone": 0,
                "io_s": 0.0, "truncated": truncated}

    runs = [run(40, True), run(50, True)]
    assert rc._cut_to_common_horizon(runs) == 40
    assert runs[1]["curve"][-1]["step"] == 40 and runs[1]["final_loss"] == runs[0]["final_loss"]
    assert runs[1]["failures"] == [[15, 1]] and runs[1]["recoveries"] == [] and runs[1]["executed_steps"] == 40
    assert rc._cut_to_common_horizon([run(40, False), run(50, False)]) is None  # nothing truncated: nothing cut
