"""A stage runner's call handling in-process: a hop computes the right gradient, bad calls change nothing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from swarm.pipeline.runner import PipelineConfig, StageRunner
from swarm.pipeline.stages import stage_state
from swarm.task import DataConfig


def _runner(stage: int, activations: str = "none") -> StageRunner:
    config = PipelineConfig(stages=2, microbatches=4, activations=activations,  # type: ignore[arg-type]
                            data=DataConfig(batch_size=8, seq_len=16))
    handle: Any = SimpleNamespace(config=SimpleNamespace(client=SimpleNamespace(peer_id=f"s{stage}")))
    runner = StageRunner(config, handle)
    runner.stage, runner.ready = stage, True
    return runner


def _call(runner: StageRunner, x: np.ndarray, targets: np.ndarray, **meta: Any) -> dict[str, Any]:
    base = {"op": "hop", "route": [[0, "eb"], [1, "bh"]], "index": 1, "train": True, "step": 3, "scale": 0.5,
            "origin": ["s0", "127.0.0.1:1"]}
    return {**base, **meta}, {"x": x, "targets": targets}  # type: ignore[return-value]


def _inputs(runner: StageRunner, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, runner.model.config.dim, generator=g)
    targets = torch.randint(0, 256, (2, 16), generator=g)
    return x.numpy(), targets.numpy()


async def test_the_last_hop_returns_the_loss_and_the_exact_input_gradient() -> None:
    runner = _runner(1)
    x, targets = _inputs(runner)
    meta, arrays = await runner._serve("s0", *_call(runner, x, targets))
    assert "error" not in meta, meta
    # The same computation on the whole model, by hand: blocks of stage 1, norm, head, scaled loss.
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = runner.model.logits(runner.model.run_blocks(xt, 1, 2))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(targets).reshape(-1))
    (loss * 0.5).backward()
    assert meta["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(torch.from_numpy(arrays["grad"]), xt.grad)
    assert runner.served == 1 and runner._accumulated == 1 and runner._graphs == 0


async def test_int8_activations_arrive_close_to_what_was_sent() -> None:
    runner = _runner(1, activations="int8")
    x, targets = _inputs(runner)
    assert runner.act_codec is not None
    payload = runner.act_codec.encode(torch.from_numpy(x).reshape(-1)).numpy()
    assert payload.nbytes < x.nbytes / 3
    meta, arrays = await runner._serve("s0", *_call(runner, payload, targets, x_codec="int8", x_shape=list(x.shape)))
    exact, exact_arrays = await _runner(1)._serve("s0", *_call(runner, x, targets))
    assert meta["loss"] == pytest.approx(exact["loss"], rel=1e-2)
    error = np.linalg.norm(arrays["grad"] - exact_arrays["grad"]) / np.linalg.norm(exact_arrays["grad"])
    assert error < 0.05


def _bad_calls(runner: StageRunner) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    x, targets = _inputs(runner)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    cases = [
        ("NaN", *_call(runner, nan, targets)),
        ("float32", *_call(runner, x[:, :, :-1], targets)),
        ("float32", *_call(runner, x.astype(np.float64), targets)),
        ("targets", *_call(runner, x, targets.astype(np.int32))),
        ("lie in", *_call(runner, x, targets + 256)),
        ("not the hop", *_call(runner, x, targets, index=0)),
        ("outside", *_call(runner, x, targets, route=[[0, "eb"], [7, "bh"]])),
        ("head", *_call(runner, x, targets, route=[[0, "eb"], [1, "b"]])),
        ("scale", *_call(runner, x, targets, scale=3.0)),
        ("origin", *_call(runner, x, targets, origin="s0")),
        ("int8 activations", *_call(runner, x, targets, x_codec="int8", x_shape=list(x.shape))),
    ]
    cases.append(("input as array 'x'", cases[0][1], {"targets": targets}))
    return cases


async def test_bad_hop_calls_get_an_error_and_change_nothing() -> None:
    runner = _runner(1)
    before = {k: v.clone() for k, v in stage_state(runner.model, runner.layout, 1).items()}
    for word, meta, arrays in _bad_calls(runner):
        reply, out = await runner._serve("s0", meta, arrays)
        assert word in reply.get("error", ""), (word, reply)
        assert not out
    after = stage_state(runner.model, runner.layout, 1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in runner.model.parameters())  # no gradient accumulated either
    assert runner._accumulated == 0 and runner._graphs == 0
    reply, _ = await runner._serve("s0", {"op": "drop tables"}, {})
    assert "unknown call" in reply["error"]


async def test_a_peer_not_serving_yet_says_its_stage_is_unavailable() -> None:
    runner = _runner(1)
    runner.ready = False
    x, targets = _inputs(runner)
    reply, _ = await runner._serve("s0", *_call(runner, x, targets))
    assert reply["unavailable"] == 1 and "not serving" in reply["error"]


async def test_weights_calls_hand_out_the_stage_and_its_copies() -> None:
    runner = _runner(1)
    runner.copies[0] = {"embed.weight": torch.ones(256, runner.model.config.dim)}
    meta, arrays = await runner._serve("s0", {"op": "weights"}, {})
    assert meta["stage"] == 1 and meta["copies"] == [0]
    assert {"w/blocks.0.attn.qkv.weight", "w/head.weight", "w/norm.weight", "c/0/embed.weight"} <= set(arrays)
    meta, arrays = await runner._serve("s0", {"op": "weights", "extras_only": True}, {})
    assert not any(k.startswith("w/blocks.") for k in arrays) and "w/head.weight" in arrays


def test_settings_a_pipeline_cannot_run_are_refused() -> None:
    from swarm.pipeline.recovery import RecoveryConfig

    with pytest.raises(ValueError, match="checkpoint"):
        PipelineConfig(recovery=RecoveryConfig(method="checkpoint"))
    with pytest.raises(ValueError, match="3"):
        PipelineConfig(stages=3, recovery=RecoveryConfig(method="checkfree+"))
    with pytest.raises(ValueError, match="multiple"):
        PipelineConfig(microbatches=3, data=DataConfig(batch_size=8))


def test_a_driver_told_to_move_during_an_eval_moves_instead_of_failing() -> None:
    """An eval that waits for a lost stage raises Moving when the coordinator moves this peer; the driver
    must drop that eval and report the move (it died on the Moving before)."""
    from swarm.pipeline.driver import Moving, drive

    runner = _runner(0)
    calls = []

    def run(coro: Any) -> float:
        coro.close()  # never awaited: the lost stage never answers
        calls.append("eval")
        runner.handle.peer.move_to = 1  # the coordinator moved this peer meanwhile
        raise Moving(1)

    runner.handle.peer = SimpleNamespace(address="127.0.0.1:1", move_to=None)
    runner.handle.run = run
    result = drive(runner, lambda: False)
    assert result["moved"] is True
    assert result["evals"] == [] and result["losses"] == []
    assert calls == ["eval"]  # the first eval batch raised; no train step and no second eval was tried
