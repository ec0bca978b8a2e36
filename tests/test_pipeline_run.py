"""Pipeline runs with real processes: a coordinator with --stages, one `swarm peer --task pipeline` per
stage, the only peer of a stage SIGKILLed mid-run and a fresh `--stage auto` peer that rebuilds it.

Nothing is faked: activations and gradients cross the data plane, the coordinator's stage map sends the
new peer to the lost stage with `recover`, and the rebuilt weights come from the neighbours' `weights`
calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.coordinator.client import ClientConfig, CoordinatorClient
from swarm.proto.v1 import coordinator_pb2 as pb
from tests.conftest import StartCoordinator, launch_coordinator

SWARM = [sys.executable, "-m", "swarm.cli.main"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STEPS = 160


def _status(target: str) -> pb.StatusReply:
    async def ask() -> pb.StatusReply:
        async with CoordinatorClient(ClientConfig(target=target, run_id="default", peer_id="observer")) as client:
            return await client.status()

    return asyncio.run(ask())


def _committed_together(target: str, stage: int, peers: set[str]) -> bool:
    return any(r.stage == stage and r.phase == "committed" and peers <= set(r.members) for r in _status(target).rounds)


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        dead = [p.args for p in procs if p.poll() not in (None, 0)]
        assert not dead, f"a process died while waiting for {what}: {dead}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


class Pipeline:
    """The peers of one run, their output files, and their reports."""

    def __init__(self, tmp: Path, target: str, stages: int, recovery: str) -> None:
        self.tmp, self.target = tmp, target
        self.common = ["--coordinator", target, "--task", "pipeline", "--stages", str(stages), "--recovery", recovery,
                       "--steps", str(STEPS), "--inner-steps", "20", "--batch-size", "8", "--seq-len", "64",
                       "--eval-every", "20", "--threads", "1", "--idle-timeout-s", "60", "--stall-timeout-s", "90"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, peer: str, stage: str) -> None:
        out = open(self.tmp / f"{peer}.out", "wb")  # noqa: SIM115 - the child holds it
        err = open(self.tmp / f"{peer}.err", "wb")  # noqa: SIM115
        self.procs[peer] = subprocess.Popen([*SWARM, "peer", *self.common, "--peer-id", peer, "--stage", stage],
                                            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_LOG_LEVEL": "INFO"})

    def driver_step(self, peer: str) -> int:
        for m in _status(self.target).members:
            if m.member.peer_id == peer:
                return int(m.progress.step)
        return -1

    def report(self, peer: str) -> dict[str, Any]:
        lines = (self.tmp / f"{peer}.out").read_text().strip().splitlines()
        assert lines, (self.tmp / f"{peer}.err").read_text()[-3000:]
        return json.loads(lines[-1])["peer_report"]

    def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for peer, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{peer} hung; stderr:\n{(self.tmp / f'{peer}.err').read_text()[-3000:]}") from None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _run_with_a_lost_stage(tmp: Path, coordinator_proc: StartCoordinator, *, stages: int, recovery: str,
                           victim: int, extra_replica: bool = False) -> dict[str, Any]:
    """Start one peer per stage, SIGKILL stage `victim`'s peer after a committed round, add a spare.

    With `extra_replica` the spare joins (for any stage) before the kill instead, as a second replica of
    stage 0, and the coordinator must move it to the lost stage.
    """
    coord = coordinator_proc(extra_args=["--stages", str(stages), "--lease-s", "2"])
    run = Pipeline(tmp, coord.target, stages, recovery)
    try:
        for stage in reversed(range(stages)):
            run.start(f"p{stage}", str(stage))
        procs = list(run.procs.values())
        if extra_replica:
            # As soon as every stage has its peer (so the thinnest stage is a tie, given to stage 0): a
            # driver alone runs ahead fast, and a spare that joins late syncs with it only near the end.
            joined = {f"p{s}" for s in range(stages)}
            _wait_for("every stage's peer joined",
                      lambda: joined <= {m.member.peer_id for m in _status(coord.target).members}, 120, procs)
            run.start("spare", "auto")
            # Wait for a committed stage-0 round of both replicas, not for a step: a spare that joins after
            # the barrier of the round at step 40 opened takes part only from the round at step 60.
            _wait_for("a stage-0 round committed by p0 and the spare",
                      lambda: _committed_together(coord.target, 0, {"p0", "spare"}), 150, list(run.procs.values()))
        # Every stage has committed a DiLoCo round (at its step 20) once the driver is past step 45.
        _wait_for("driver step 45", lambda: run.driver_step("p0") >= 45, 120, procs)
        killed_at = run.driver_step("p0")
        run.procs[f"p{victim}"].send_signal(signal.SIGKILL)
        run.procs[f"p{victim}"].wait(timeout=10)
        others = [p for name, p in run.procs.items() if name != f"p{victim}"]

        def lost_or_moved() -> bool:
            # With a spare already in the run the coordinator may move it within one lease, so the stage can
            # be lost for less than a poll and the run may even finish first: then the reports decide.
            status = _status(coord.target)
            if list(status.lost_stages) == [victim]:
                return True
            if not extra_replica:
                return False
            moved = any(m.member.peer_id == "spare" and m.stage == victim for m in status.members)
            return moved or all(p.poll() is not None for p in others)

        _wait_for(f"stage {victim} reported lost", lost_or_moved, 30, others)
        if not extra_replica:
            run.start("spare", "auto")
        run.wait_all(timeout_s=200)
        reports = {peer: run.report(peer) for peer in run.procs if peer != f"p{victim}"}
        codes = {peer: proc.returncode for peer, proc in run.procs.items()}
        return {"reports": reports, "codes": codes, "killed_at": killed_at, "victim": f"p{victim}"}
    finally:
        run.kill_all()
        coord.stop()


@pytest.fixture(scope="module")
def middle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """checkfree, 3 stages, the only peer of stage 1 SIGKILLed."""
    yield from _module_run(tmp_path_factory, "middle", stages=3, recovery="checkfree", victim=1)


@pytest.fixture(scope="module")
def end(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """checkfree+, 4 stages, the only peer of stage 0 (the driver, owner of the embedding) SIGKILLed."""
    yield from _module_run(tmp_path_factory, "end", stages=4, recovery="checkfree+", victim=0)


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """checkfree, 3 stages, a movable second replica of stage 0; the only peer of stage 1 SIGKILLed."""
    yield from _module_run(tmp_path_factory, "moved", stages=3, recovery="checkfree", victim=1, extra_replica=True)


def _module_run(factory: pytest.TempPathFactory, name: str, **kw: Any) -> Iterator[dict[str, Any]]:
    tmp = factory.mktemp(name)
    yield _run_with_a_lost_stage(tmp, lambda **args: launch_coordinator(tmp, **args), **kw)


def _evals(report: dict[str, Any]) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_loss"]) for e in report["extra"]["evals"]]


def test_a_lost_middle_stage_is_rebuilt_from_its_neighbours_on_another_peer(middle: dict[str, Any]) -> None:
    reports, codes = middle["reports"], middle["codes"]
    assert codes["p1"] == -signal.SIGKILL
    assert all(codes[p] == 0 for p in ("p0", "p2", "spare")), codes
    spare = reports["spare"]["extra"]
    assert spare["stage"] == 1
    recovery = spare["recovery"]
    assert recovery["kind"] == "average" and set(recovery["sources"]) == {"0", "2"}
    assert recovery["sources"] == {"0": "p0", "2": "p2"}
    assert all(norm > 0 for norm in recovery["grad_norms"].values())  # weighted by the neighbours' real norms
    assert recovery["lr_scale"] == pytest.approx(1.1)
    assert recovery["step"] >= middle["killed_at"] - 2  # it continued the stage's step count
    assert spare["served"] > 0 and spare["steps"] > recovery["step"]


def test_the_driver_waited_for_the_lost_stage_and_loss_kept_falling(middle: dict[str, Any]) -> None:
    driver = middle["reports"]["p0"]
    extra = driver["extra"]
    assert driver["stopped_by"] == "done" and extra["steps"] == STEPS
    stalls = extra["stalls"]
    assert all(s["waited_s"] is not None for s in stalls)  # every wait ended (startup ones included)
    after_kill = [s for s in stalls if s["step"] >= middle["killed_at"]]
    assert after_kill and all(s["stage"] == 1 for s in after_kill)
    evals = _evals(driver)
    assert evals[0][1] > 5.0 and evals[-1][0] == STEPS
    before = [loss for step, loss in evals if step <= middle["killed_at"]][-1]
    assert evals[-1][1] < before  # training went on from the rebuilt stage, and improved
    assert evals[-1][1] < evals[0][1] - 1.5


def test_a_lost_end_stage_is_copied_from_its_swap_partner_under_checkfree_plus(end: dict[str, Any]) -> None:
    reports, codes = end["reports"], end["codes"]
    assert codes["p0"] == -signal.SIGKILL
    assert all(codes[p] == 0 for p in ("p1", "p2", "p3", "spare")), (codes, reports["spare"]["stopped_by"])
    spare = reports["spare"]
    extra = spare["extra"]
    assert extra["stage"] == 0 and spare["stopped_by"] == "done"
    recovery = extra["recovery"]
    assert recovery["kind"] == "copy" and "extras from the copy it keeps" in recovery["reason"]
    assert recovery["sources"]["1"] == "p1"
    # The new driver picked up at the run's step, from trained weights, and trained to the end.
    evals = _evals(spare)
    start_step, start_loss = evals[0]
    assert start_step >= end["killed_at"] - 2 and extra["steps"] == STEPS
    assert start_loss < 4.5  # an untrained model scores about ln(256) = 5.5
    assert evals[-1][1] < start_loss
    for peer in ("p1", "p2", "p3"):
        assert reports[peer]["stopped_by"] == "done", reports[peer]["stopped_by"]


def test_the_coordinator_moves_a_spare_replica_to_the_lost_stage(moved: dict[str, Any]) -> None:
    reports, codes = moved["reports"], moved["codes"]
    assert all(codes[p] == 0 for p in ("p0", "p2", "spare")), codes
    spare = reports["spare"]
    first, second = spare["extra"]["stages_served"]
    # It served stage 0 next to p0 (a second driver, in DiLoCo with it), then was moved to rebuild stage 1.
    assert first["stage"] == 0 and first["stopped_by"] == "moving to stage 1" and first["steps"] > 0
    assert second["stage"] == 1 and second["recovery"]["kind"] == "average" and second["stopped_by"] == "done"
    assert second["served"] > 0
    driver = reports["p0"]
    assert driver["stopped_by"] == "done" and driver["extra"]["steps"] == STEPS
    assert any(len(r["members"]) == 2 for r in driver["per_round"].values())  # stage 0 synced with the spare
    evals = _evals(driver)
    assert evals[-1][1] < evals[0][1] - 1.5


def test_swarm_local_runs_a_pipeline_and_a_joiner_rebuilds_the_killed_stage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [*SWARM, "local", "--task", "pipeline", "--stages", "3", "--steps", "120", "--kill", "1@50", "--join", "200",
         "--lease-s", "2", "--no-view", "--out", str(out), "--timeout-s", "200"],
        check=False, capture_output=True, text=True, timeout=260,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    peers = summary["peers"]
    assert peers["peer-1"]["killed"]
    # The joiner was due at step 200, but came as soon as stage 1 was lost (the run cannot pass step 50 without it).
    joiner = peers["peer-3"]["extra"]
    assert joiner["stage"] == 1 and joiner["recovery"]["kind"] == "average"
    assert all(peers[p]["stopped_by"] == "done" for p in ("peer-0", "peer-2", "peer-3"))
    driver = peers["peer-0"]["extra"]
    assert driver["steps"] == 120 and driver["final_eval_loss"] < driver["evals"][0]["eval_loss"] - 1.5
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_peer_with_another_stage_count_than_the_coordinator_is_refused_clearly(tmp_path: Path) -> None:
    coord = launch_coordinator(tmp_path, extra_args=["--stages", "2"])
    try:
        proc = subprocess.run([*SWARM, "peer", "--coordinator", coord.target, "--task", "pipeline", "--stages", "3"],
                              check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert "coordinator runs 2 pipeline stage(s)" in proc.stderr and "--stages 3" in proc.stderr
        assert not _status(coord.target).members  # it left again
    finally:
        coord.stop()
