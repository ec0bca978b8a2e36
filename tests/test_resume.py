"""Kill every peer of a run, restart them from their checkpoints: the run goes on from the committed state.

Real processes: a coordinator (on a database) and `swarm peer --task train` peers writing a checkpoint every
round. Both peers are SIGKILLed mid-run; a fresh peer without a checkpoint is then refused (the run's state
would be thrown away) with the checkpoints named; the two restarted on their checkpoint folders resume on a
committed hash, finish the run on one hash, and `swarm export` writes weights that score the final eval loss.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm import checkpoint as ck
from tests.conftest import StartCoordinator

SWARM = [sys.executable, "-m", "swarm.cli.main"]
H = 5
TRAIN = ["--task", "train", "--model", "tiny", "--inner-steps", str(H), "--threads", "1", "--batch-size", "4",
         "--seq-len", "64", "--retry-for-s", "10", "--checkpoint-every", "1", "--keep", "2", "--shard", "auto"]


def _peer(tmp: Path, target: str, name: str, steps: int, *extra: str, tag: str = "") -> subprocess.Popen[bytes]:
    with open(tmp / f"{name}{tag}.out", "wb") as out, open(tmp / f"{name}{tag}.err", "wb") as err:
        return subprocess.Popen([*SWARM, "peer", "--coordinator", target, "--peer-id", name, "--steps", str(steps),
                                 *TRAIN, *extra], stdout=out, stderr=err, stdin=subprocess.DEVNULL)


def _report(path: Path) -> dict:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith('{"peer_report"')]
    assert lines, path.read_text()[-2000:]
    return json.loads(lines[-1])["peer_report"]


def _reported(target: str, at_least: int = 3) -> set[str]:
    """The members whose heartbeats reported a checkpoint of round `at_least` or later."""
    out = subprocess.run([*SWARM, "status", "--coordinator", target, "--json"], capture_output=True, text=True,
                         timeout=30, check=False)
    if out.returncode != 0:
        return set()
    members = json.loads(out.stdout).get("members", [])
    return {m["member"]["peer_id"] for m in members
            if m["progress"].get("has_checkpoint") and m["progress"].get("checkpoint_round", 0) >= at_least}


def _initial_eval_loss() -> float:
    from swarm.task import Corpus, DataConfig, build_model, evaluate

    data = DataConfig(batch_size=4, seq_len=64)
    return evaluate(build_model("tiny", seed=0), Corpus.load(data).eval, seq_len=64, batch_size=4, batches=8,
                    device="cpu")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_whose_peers_all_died_resumes_from_their_checkpoints(tmp_path: Path,
                                                                     coordinator_proc: StartCoordinator) -> None:
    coord = coordinator_proc(db=tmp_path / "run.db", extra_args=["--min-peers", "2", "--lease-s", "2", "--shards", "2"])
    dirs = {name: tmp_path / f"{name}-ckpt" for name in ("p0", "p1")}
    peers = [_peer(tmp_path, coord.target, name, 100_000, "--checkpoint-dir", str(d)) for name, d in dirs.items()]
    try:
        deadline = time.monotonic() + 150
        # Killed once the coordinator has heard (with the heartbeats) of both peers' checkpoints of round 3 on:
        # rounds of this tiny model take milliseconds, far less than a heartbeat interval.
        while not (all(len(ck.rounds(d)) >= 2 for d in dirs.values()) and _reported(coord.target) >= {"p0", "p1"}):
            assert time.monotonic() < deadline, "no reported checkpoints of round 3 within 150 s"
            assert all(p.poll() is None for p in peers), (tmp_path / "p0.err").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        for p in peers:
            p.send_signal(signal.SIGKILL)
            p.wait()
    saved = {name: ck.newest(d) for name, d in dirs.items()}
    assert all(c is not None for c in saved.values())
    newest = max(c.round for c in saved.values())
    time.sleep(3)  # their leases (2 s) run out: nobody live holds the run's state now

    # A peer with nothing saved would start the run over from its initial weights: it is refused, saying why.
    fresh = _peer(tmp_path, coord.target, "p9", 100_000)
    assert fresh.wait(timeout=60) == 1
    err = (tmp_path / "p9.err").read_text()
    assert "no live member holds its state" in err and "--resume" in err, err[-2000:]
    assert "checkpoints were reported of round" in err, err[-2000:]

    # Restarted on their folders, both resume (from their newest checkpoints) and finish 3 rounds later.
    steps = (newest + 1 + 3) * H
    again = [_peer(tmp_path, coord.target, name, steps, "--checkpoint-dir", str(d), tag=".2") for name, d in dirs.items()]
    for p in again:
        assert p.wait(timeout=150) == 0, (tmp_path / "p0.2.err").read_text()[-3000:]
    reports = {name: _report(tmp_path / f"{name}.2.out") for name in dirs}
    for name, r in reports.items():
        extra = r["extra"]
        assert extra["resumed_from"]["round"] == saved[name].round and extra["resumed_from"]["hash"] == saved[name].hash
        assert extra["final_round"] == newest + 3 and r["rounds_committed"] >= 1, r
        assert not extra["checkpoint_errors"]
    assert reports["p0"]["state_hash"] == reports["p1"]["state_hash"]
    assert sorted(r["extra"]["shard"] for r in reports.values()) == [[0, 2], [1, 2]]  # --shard auto: no overlap
    start_loss = reports["p0"]["extra"]["evals"][0]["eval_loss"]
    assert start_loss < _initial_eval_loss() - 0.3  # it went on from the trained weights, not from scratch

    # The final state is on disk (written when the peer stopped) and exports to weights that score the same loss.
    final = ck.newest(dirs["p0"])
    assert final.round == newest + 3 and final.hash == reports["p0"]["state_hash"]
    assert len(ck.rounds(dirs["p0"])) == 2  # --keep 2
    out = tmp_path / "exported"
    done = subprocess.run([*SWARM, "export", str(dirs["p0"]), "--to", str(out)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_model

    from swarm.task import Corpus, DataConfig, build_model, evaluate

    model = build_model("tiny", seed=1)
    load_model(model, str(out / "model.safetensors"))
    loss = evaluate(model, Corpus.load(DataConfig(batch_size=4, seq_len=64)).eval, seq_len=64, batch_size=4,
                    batches=8, device="cpu")
    assert abs(loss - reports["p0"]["extra"]["final_eval_loss"]) < 1e-4
    # Exporting again into the same folder is refused: the user's files are not overwritten unasked.
    again_out = subprocess.run([*SWARM, "export", str(dirs["p0"]), "--to", str(out)], capture_output=True, text=True,
                               timeout=120, check=False)
    assert again_out.returncode == 2 and "not an empty folder" in again_out.stderr
