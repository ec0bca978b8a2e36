"""Poisoned updates in a real run: a coordinator with a norm bound and trimmed-mean, three honest peers and
one attacker (`swarm peer --task average --attack KIND`), all separate processes.

An attacker whose update is out of bound is named in the rounds' reasons and quarantined after repeats;
one that lies about its norm is named by the parts' owners in their failure reports (and quarantined the
same way). In the `average` task the contributions are independent random vectors, so a sign flip is just
another one (not named; the trimmed mean bounds it); in a `train` run peers' pseudo-gradients point alike
and a sign-flipper is named by its direction (its cosine with the round's mean) and quarantined. In every case the honest peers end on one hash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.coordinator.store import SqliteStore
from tests.conftest import StartCoordinator

ROUNDS = 6
COORDINATOR = ["--min-peers", "3", "--rendezvous-timeout-s", "4", "--norm-bound", "4", "--aggregate", "trimmed-mean",
               "--quarantine-after", "2", "--quarantine-rounds", "5", "--run-id", "robust"]


def _peer(tmp: Path, target: str, name: str, attack: str = "") -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "swarm.cli.main", "peer", "--coordinator", target, "--run-id", "robust",
            "--peer-id", name, "--task", "average", "--numel", "20000", "--rounds", str(ROUNDS), "--work-s", "0.2",
            "--allreduce-timeout-s", "5"]
    if attack:
        argv += ["--attack", attack]
    err = open(tmp / f"{name}.err", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)


def _reports(tmp: Path, procs: dict[str, subprocess.Popen[str]]) -> dict[str, dict]:
    out = {}
    for name, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} hung:\n{(tmp / f'{name}.err').read_text()[-3000:]}")
        assert proc.returncode == 0, (tmp / f"{name}.err").read_text()[-3000:]
        out[name] = json.loads(stdout.strip().splitlines()[-1])["peer_report"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("attack", ["scale:100", "noise:10", "bias:10", "lie:scale:100", "signflip"])
def test_an_attacker_is_named_and_the_honest_peers_end_on_one_hash(tmp_path: Path, coordinator_proc: StartCoordinator,
                                                                  attack: str) -> None:
    db = tmp_path / "run.db"
    coord = coordinator_proc(db=db, extra_args=COORDINATOR)
    procs = {name: _peer(tmp_path, coord.target, name) for name in ("h0", "h1", "h2")}
    procs["x"] = _peer(tmp_path, coord.target, "x", attack)
    reports = _reports(tmp_path, procs)
    coord.kill()
    honest = [reports[p] for p in ("h0", "h1", "h2")]
    assert len({r["state_hash"] for r in honest}) == 1, [r["state_hash"] for r in honest]
    assert all(r["rounds_committed"] >= ROUNDS - 1 for r in honest)
    store = SqliteStore(db, "robust")
    rounds = sorted((r for r in store.state.rounds.values()), key=lambda r: r.number)
    store.close()
    assert all(r.aggregate == "trimmed-mean:1" for r in rounds if r.phase == "committed")
    refused = [dict(r.refused).get("x", "") for r in rounds]
    # The first round x took part in (averaged in or refused): it may join after the honest three began round 0.
    first = next((why for r, why in zip(rounds, refused, strict=True) if why or "x" in r.members), None)
    if attack in ("scale:100", "noise:10", "bias:10"):
        # Refused in the first round it sends, named with its norm; quarantined from the third on.
        assert first is not None and first.startswith("contribution norm"), [r.reasons for r in rounds[:2]]
        assert any(why.startswith("quarantined: refused in 2 of the last 5 rounds") for why in refused), refused
        assert all("x" not in r.members for r in rounds), "an out-of-bound update was never averaged in"
        assert reports["x"]["resyncs"] >= 1  # it took the honest state instead of keeping its own
    elif attack == "lie:scale:100":
        # The bound sees an honest norm; the parts' owners see the lie and name it.
        seen = [f for r in honest for f in r["failures_seen"]]
        assert any("x: sent a part of norm" in f and "while declaring" in f for f in seen), seen
        assert all("x" not in r.members for r in rounds if r.phase == "committed")
        assert first == "sent more than the norm it declared", [r.reasons for r in rounds[:2]]
        assert any(why.startswith("quarantined: refused in 2 of the last 5 rounds") for why in refused), refused
    else:  # signflip: a normal norm; not named, its values are trimmed with everyone else's extremes
        assert not any(refused) and reports["x"]["state_hash"] == honest[0]["state_hash"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sign_flipping_trainer_is_named_by_direction_and_quarantined(tmp_path: Path,
                                                                       coordinator_proc: StartCoordinator) -> None:
    # DiLoCo pseudo-gradients of peers training one model point alike; a flipped one points against their mean.
    db = tmp_path / "run.db"
    coord = coordinator_proc(db=db, extra_args=COORDINATOR)
    train = ["--task", "train", "--model", "tiny", "--inner-steps", "5", "--steps", "40", "--threads", "1",
             "--batch-size", "4", "--seq-len", "64", "--shard", "auto"]

    def start(name: str, *extra: str) -> subprocess.Popen[str]:
        err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([sys.executable, "-m", "swarm.cli.main", "peer", "--coordinator", coord.target,
                                 "--run-id", "robust", "--peer-id", name, *train, *extra],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)

    procs = {name: start(name) for name in ("h0", "h1", "h2")}
    procs["x"] = start("x", "--attack", "signflip")
    reports = _reports(tmp_path, procs)
    coord.kill()
    honest = [reports[p] for p in ("h0", "h1", "h2")]
    assert len({r["state_hash"] for r in honest}) == 1, [r["state_hash"] for r in honest]
    store = SqliteStore(db, "robust")
    rounds = sorted(store.state.rounds.values(), key=lambda r: r.number)
    store.close()
    refused = [dict(r.refused).get("x", "") for r in rounds]
    # The first round x took part in (averaged in or refused): it may join after the honest three began round 0.
    first = next((why for r, why in zip(rounds, refused, strict=True) if why or "x" in r.members), None)
    # The first round x sent to (the honest three may start round 0 before x arrives: min_peers is 3).
    first = next(why for r, why in zip(rounds, refused, strict=True) if why or "x" in r.members)
    assert first.startswith("its update points against the round's mean (cosine -"), [r.reasons for r in rounds]
    assert any(why.startswith("quarantined: refused in 2 of the last 5 rounds") for why in refused), refused
