"""What a new user meets when something is wrong: one clear line, an exit code, nothing lost (issue 16)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swarm.cli.local_cmd import MARKER, first_error, prepare_out
from tests.conftest import StartCoordinator

SWARM = [sys.executable, "-m", "swarm.cli.main"]


def _swarm(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWARM, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)


def _dead_address() -> str:
    """host:port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_local_refuses_an_out_folder_holding_other_files_and_touches_nothing(tmp_path: Path) -> None:
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's own work")
    result = _swarm("local", "--task", "average", "--peers", "2", "--rounds", "1", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "non-empty folder" in result.stderr and str(tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and mine.read_text() == "the user's own work"


def test_local_refuses_an_out_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        prepare_out(target)
    assert target.read_text() == "keep"


def test_a_rerun_into_an_earlier_runs_folder_replaces_only_the_runs_own_files(tmp_path: Path) -> None:
    prepare_out(tmp_path / "run")  # new: created and marked
    run = tmp_path / "run"
    assert (run / MARKER).is_file()
    own = ["summary.json", "loss.png", "coordinator.db", "coordinator.db-wal", "coordinator.log", "peer-0.log",
           "peer-12.log"]
    for name in own:
        (run / name).write_text("old")
    (run / "analysis.ipynb").write_text("the user's")
    (run / "sub").mkdir()
    prepare_out(run)
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "analysis.ipynb", "sub"])
    assert (run / "analysis.ipynb").read_text() == "the user's"


def test_a_run_folder_from_before_the_marker_is_still_reused(tmp_path: Path) -> None:
    for name in ("summary.json", "loss.png", "coordinator.db", "coordinator.log", "peer-0.log"):
        (tmp_path / name).write_text("old")
    prepare_out(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_an_empty_out_folder_is_used(tmp_path: Path) -> None:
    prepare_out(tmp_path)
    assert (tmp_path / MARKER).is_file()


def test_local_refuses_missing_data_before_starting_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _swarm("local", "--data", str(tmp_path / "nonexistent"), "--out", str(out))
    assert result.returncode == 2
    assert f"--data {tmp_path / 'nonexistent'}: no such file or folder" in result.stderr
    assert not out.exists()  # nothing was started, nothing written


def test_local_refuses_a_join_after_the_last_step(tmp_path: Path) -> None:
    result = _swarm("local", "--steps", "40", "--inner-steps", "20", "--join", "40", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "--join 40" in result.stderr


@pytest.mark.slow
def test_local_prints_the_first_error_of_a_peer_that_failed(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too little text to train on\n")
    out = tmp_path / "run"
    result = _swarm("local", "--peers", "2", "--steps", "20", "--inner-steps", "20", "--data", str(tiny), "--no-view",
                    "--out", str(out), "--timeout-s", "90", "--rendezvous-timeout-s", "10", timeout=150)
    assert result.returncode == 1, result.stderr
    # The cause is on the terminal, not only in peer-N.log.
    assert "peer-0 exited 2: swarm peer: too little text" in result.stderr, result.stderr


def test_first_error_prefers_the_commands_own_message_then_the_traceback(tmp_path: Path) -> None:
    log = tmp_path / "peer.log"
    log.write_text("2026-12-04 INFO swarm.peer: joined\nTraceback (most recent call last):\n  File x\n"
                   "ValueError: bad thing\n")
    assert first_error(log) == "ValueError: bad thing"
    log.write_text("2026-12-04 INFO swarm.peer: joined\nswarm peer: data path 'x' does not exist\n")
    assert first_error(log) == "swarm peer: data path 'x' does not exist"
    log.write_text("just a line\n")
    assert first_error(log) == "just a line"
    assert first_error(tmp_path / "absent.log").startswith("(no log")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("task", ["train", "pipeline"])
def test_peer_on_cuda_without_cuda_says_so_in_one_line(task: str) -> None:
    result = _swarm("peer", "--coordinator", _dead_address(), "--task", task, "--device", "cuda")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--device cuda" in result.stderr and "--device cpu" in result.stderr


def test_peer_with_a_device_torch_does_not_know_says_so() -> None:
    result = _swarm("peer", "--coordinator", _dead_address(), "--device", "gpu0")
    assert result.returncode == 2 and "--device 'gpu0' is not a device" in result.stderr


def test_peer_says_at_once_that_the_coordinator_is_unreachable(tmp_path: Path) -> None:
    dead = _dead_address()
    err = tmp_path / "peer.err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([*SWARM, "peer", "--coordinator", dead, "--task", "control", "--retry-for-s", "120"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # Long before the 120 s of retries are over, the user knows what is going on.
        deadline = time.monotonic() + 60
        while "not reachable" not in err.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        text = err.read_text()
        assert f"coordinator {dead} not reachable (Connection refused), retrying for 1" in text, text
        assert proc.poll() is None  # still retrying
    finally:
        proc.kill()
        proc.wait()


def test_peer_gives_up_on_an_unreachable_coordinator_with_a_readable_error() -> None:
    dead = _dead_address()
    result = _swarm("peer", "--coordinator", dead, "--task", "control", "--retry-for-s", "1")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"swarm peer: stopped on error: coordinator {dead} not reachable (Connection refused)")
    assert "failed to connect to all addresses" not in result.stderr  # no raw gRPC text


@pytest.mark.slow
def test_a_peer_that_arrives_after_the_last_round_says_so_and_exits_non_zero(
    tmp_path: Path, coordinator_proc: StartCoordinator
) -> None:
    coord = coordinator_proc(extra_args=["--min-peers", "1"])
    common = ["peer", "--coordinator", coord.target, "--steps", "20", "--inner-steps", "20", "--threads", "1"]
    first = _swarm(*common, "--peer-id", "first", timeout=150)
    assert first.returncode == 0, first.stderr[-2000:]
    late = _swarm(*common, "--peer-id", "late", timeout=150)
    assert late.returncode == 1, late.stderr[-2000:]
    assert "already committed its last round" in late.stderr
    report = json.loads(late.stdout.strip().splitlines()[-1])["peer_report"]
    assert report["stopped_by"] == "run already finished" and report["rounds_committed"] == 0
