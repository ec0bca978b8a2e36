"""End-to-end: `swarm local` with real processes, a real SIGKILL and a real Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import StartCoordinator, wait_peer_joined

SWARM = [sys.executable, "-m", "swarm.cli.main"]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_local_run_survives_sigkill_of_a_peer(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*SWARM, "local", "--task", "average", "--peers", "4", "--rounds", "8", "--work-s", "0.1", "--lease-s", "2",
         "--kill", "1@2", "--no-view", "--out", str(out), "--timeout-s", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while len(children) < 5 and time.monotonic() < deadline and proc.poll() is None:
            children = _descendants(proc.pid)
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    peers = summary["peers"]
    assert peers["peer-1"]["killed"] and peers["peer-1"]["exit_code"] == -signal.SIGKILL
    survivors = [p for name, p in peers.items() if name != "peer-1"]
    assert all(p["stopped_by"] == "done" and p["exit_code"] == 0 for p in survivors)
    assert len({p["state_hash"] for p in survivors}) == 1, "survivors diverged"
    assert summary["state_hashes_identical"]
    rounds = {int(r["round"]): r for r in summary["coordinator"]["rounds"]}
    assert all(rounds[n]["phase"] == "committed" for n in range(8) if n in rounds)
    # The killed peer was excluded: a later round ran without it.
    assert "peer-1" not in rounds[7]["members"] and len(rounds[7]["members"]) == 3
    assert len(children) >= 5, "expected a coordinator and 4 peers"
    assert not _alive(children), "processes left behind"


@pytest.mark.slow
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*SWARM, "local", "--task", "average", "--peers", "3", "--rounds", "1000", "--work-s", "0.2", "--no-view", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    progress: list[str] = []
    reader = threading.Thread(target=lambda: progress.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 60
        # Wait until the run is really going: all 3 peers joined (the progress line counts members),
        # so every peer has its signal handlers and can leave cleanly.
        while not any("3 members" in line for line in progress) and time.monotonic() < deadline:
            time.sleep(0.2)
        children = _descendants(proc.pid)
        assert len(children) >= 4, progress
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        stderr = "".join(progress)
        assert proc.returncode == 130, stderr
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["interrupted"]
        # Peers got SIGTERM from `swarm local` and left the run cleanly.
        assert all(p["stopped_by"] == "SIGTERM" for p in summary["peers"].values()), summary["peers"]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            p.kill()


@pytest.mark.slow
def test_local_run_with_sparseloco_on_the_wire(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [*SWARM, "local", "--task", "average", "--peers", "3", "--rounds", "3", "--work-s", "0", "--numel", "100000",
         "--codec", "sparseloco", "--no-view", "--out", str(out), "--timeout-s", "90"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state_hashes_identical"] and summary["finished_peers"] == 3
    fp32_bytes_per_round = 2 * (3 - 1) / 3 * 100_000 * 4
    for peer in summary["peers"].values():
        assert peer["rounds_committed"] == 3
        # Its payload, 141x below fp32, whole to each of the 2 others (gathered): 46x below the fp32
        # butterfly. The butterfly with the 8-bit union of three selections as results was 27x.
        assert peer["bytes_sent"] < 3 * fp32_bytes_per_round / 40


@pytest.mark.slow
def test_swarm_local_runs_over_tls_by_default_and_a_rerun_makes_new_keys(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [*SWARM, "local", "--task", "average", "--peers", "2", "--rounds", "2", "--work-s", "0", "--numel", "20000",
           "--no-view", "--out", str(out), "--timeout-s", "90"]
    fingerprints = []
    for _ in range(2):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["state_hashes_identical"] and summary["finished_peers"] == 2
        assert "serving over mutual TLS" in (out / "coordinator.log").read_text()
        keys = sorted(p.name for p in (out / "keys").iterdir())
        assert keys == ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key", "local.crt", "local.key",
                        "peer-0.crt", "peer-0.key", "peer-1.crt", "peer-1.key"]
        assert all((out / "keys" / k).stat().st_mode & 0o077 == 0 for k in keys if k.endswith(".key"))
        fingerprints.append((out / "keys" / "ca.crt").read_bytes())
    assert fingerprints[0] != fingerprints[1], "the rerun kept the old run's CA"
    plain = subprocess.run([*cmd[:-4], "--no-tls", "--out", str(tmp_path / "plain"), "--timeout-s", "90"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    assert not (tmp_path / "plain" / "keys").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_whose_parent_died_before_the_prctl_never_runs(tmp_path: Path) -> None:
    # The race: `swarm local` killed between a child's start and its prctl leaves no one to send the
    # SIGTERM. Passing a pid that is not the child's parent stands in for a parent already gone.
    from swarm.utils import dies_with_parent

    marker = tmp_path / "ran"
    cmd = dies_with_parent([sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"])
    pid_at = cmd.index(str(os.getpid()))
    gone = subprocess.run([*cmd[:pid_at], str(os.getpid() + 1_000_000), *cmd[pid_at + 1:]], timeout=30, check=False)
    assert gone.returncode == 128 + signal.SIGTERM and not marker.exists()
    alive = subprocess.run(cmd, timeout=30, check=False)
    assert alive.returncode == 0 and marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_wrapped_child_gets_the_signal_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    # A parent (a shell-less python) starts a wrapped sleeper, prints its pid, and is SIGKILLed.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         ("import subprocess, sys, time\n"
          "from swarm.utils import dies_with_parent\n"
          "child = subprocess.Popen(dies_with_parent([sys.executable, '-c', 'import time; time.sleep(600)']))\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.kill()
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs([child], timeout=20)  # not our child: psutil cannot read its status
        assert not alive, "the wrapped child outlived its SIGKILLed parent"
    finally:
        if child.is_running():
            child.kill()


@pytest.mark.slow
def test_a_joiner_takes_part_even_when_it_joins_one_round_before_the_end(tmp_path: Path) -> None:
    # The joiner's process starts with the others and waits, set up, for its round: one started only at
    # round 6 of 8 spent its import time there and arrived after the last round (issue 16).
    out = tmp_path / "run"
    result = subprocess.run(
        [*SWARM, "local", "--task", "average", "--peers", "3", "--rounds", "8", "--work-s", "0.5", "--numel", "1000",
         "--join", "6", "--no-view", "--out", str(out), "--timeout-s", "90"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "fork" not in result.stderr  # gRPC's fork() warnings stay out of the terminal
    summary = json.loads((out / "summary.json").read_text())
    joiner = summary["peers"]["peer-3"]
    assert joiner["stopped_by"] == "done" and joiner["exit_code"] == 0
    assert joiner["rounds_committed"] >= 1 and min(int(r) for r in joiner["per_round"]) >= 6
    assert summary["state_hashes_identical"] and summary["finished_peers"] == 4
    # The children's logs say what happened without --log-level.
    assert "joined run" in (out / "peer-0.log").read_text()


@pytest.mark.slow
def test_children_stop_when_swarm_local_is_sigkilled(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*SWARM, "local", "--task", "average", "--peers", "2", "--rounds", "1000", "--work-s", "0.2", "--no-view",
         "--out", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(children) < 3 and time.monotonic() < deadline:
            children = _descendants(proc.pid)
            time.sleep(0.2)
        assert len(children) >= 3
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"outlived swarm local: {[p.cmdline() for p in alive]}"
    finally:
        for p in children:
            if p.is_running():
                p.kill()


def _peer(target: str, peer_id: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SWARM, "--log-level", "INFO", "peer", "--coordinator", target, "--peer-id", peer_id, "--task", "average",
         "--rounds", "1000", "--work-s", "0.2", "--numel", "1000"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / f"{peer_id}.err", "w"), text=True,
    )


def _stops_promptly_on_sigterm(proc: subprocess.Popen[str], tmp_path: Path, peer_id: str) -> dict:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)  # the client alone retries an unreachable coordinator for 30 s
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{peer_id} hung after SIGTERM:\n{(tmp_path / f'{peer_id}.err').read_text()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["peer_report"]


@pytest.mark.slow
def test_a_peer_stops_promptly_on_sigterm_when_its_coordinator_is_gone(
    tmp_path: Path, coordinator_proc: StartCoordinator
) -> None:
    # `swarm local` dying takes the coordinator and the peers down together (PDEATHSIG): a peer must not
    # wait out the coordinator's retries, whether it is still joining or leaving.
    with socket.socket() as s:  # a port nothing listens on: the join keeps meeting UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    joining = _peer(dead, "joining", tmp_path)
    coord = coordinator_proc()
    joined = _peer(coord.target, "joined", tmp_path)
    try:
        assert wait_peer_joined(joined, tmp_path / "joined.err", timeout_s=60), (tmp_path / "joined.err").read_text()
        coord.kill()
        time.sleep(1.0)  # the joining peer is well inside its retries by now, the other one has lost its coordinator
        report = _stops_promptly_on_sigterm(joined, tmp_path, "joined")
        assert report["stopped_by"] == "SIGTERM"
        report = _stops_promptly_on_sigterm(joining, tmp_path, "joining")
        assert report["stopped_by"] == "SIGTERM" and report["rounds_committed"] == 0
    finally:
        for p in (joining, joined):
            if p.poll() is None:
                p.kill()
                p.wait()
