"""A real swarm across hosts of the WAN lab (issue 19): a coordinator and two public peers on their own
addresses, and a peer behind a NAT router that drops every unsolicited inbound connection. Mutual TLS on
both planes, as over the internet. The NAT'd peer cannot be dialed, so it takes part by dialing the others
(connection reversal); two such peers meet through a public one (a relay). Every peer must end every round
with the same state hash.

Needs root, iproute2 and nftables (`make lab-deps`); skips saying so otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.security import COORDINATOR, init_ca, issue
from tests.test_wanlab import needs_lab, needs_nft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from wanlab import WanLab

pytestmark = [needs_lab, needs_nft, pytest.mark.slow]

RUN = "nat-run"
ROUNDS = 4
PORT = 7000
DATA_PORT = 7100
PUBLIC, NATTED = (1, 2), (3, 4)
"""Hosts 1 and 2 have their own addresses; hosts 3 and 4 each sit behind a NAT router of their own (so they cannot
dial each other either); host 0 runs the coordinator."""


def swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", *args]


@pytest.fixture(scope="module")
def lab() -> Iterator[WanLab]:
    with WanLab(5, rate_mbit=1000, nat=list(NATTED)) as lab:
        yield lab


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    init_ca(folder, RUN)
    for name in (COORDINATOR, "p1", "p2", "p3", "p4", "looped"):
        issue(folder, name)
    return folder


@pytest.fixture(scope="module")
def coordinator(lab: WanLab, keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("coordinator") / "stderr"
    with open(log, "wb") as err:
        proc = lab.exec(0, swarm("coordinator", "--host", lab.ip(0), "--port", str(PORT), "--tls-dir", str(keys),
                                 "--run-id", RUN, "--min-peers", "4", "--lease-s", "10"),
                        stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert "listening" in line, log.read_text()
    yield f"{lab.ip(0)}:{PORT}"
    proc.terminate()
    proc.wait(timeout=10)


def peer(lab: WanLab, host: int, name: str, coordinator: str, keys: Path, *extra: str) -> subprocess.Popen[bytes]:
    return lab.exec(host, swarm("peer", "--coordinator", coordinator, "--run-id", RUN, "--peer-id", name,
                                "--tls-dir", str(keys), "--task", "average", "--numel", "200000",
                                "--rounds", str(ROUNDS), "--work-s", "0.1", "--data-host", "0.0.0.0",
                                "--data-port", str(DATA_PORT), "--retry-for-s", "10", *extra),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def report(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout_s)
    lines = [json.loads(x)["peer_report"] for x in out.decode().splitlines() if x.startswith('{"peer_report"')]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{err.decode()[-3000:]}"
    return lines[-1], err.decode()


def test_peers_behind_nat_average_with_public_peers_and_through_a_relay_and_all_end_identical(
        lab: WanLab, keys: Path, coordinator: str) -> None:
    started = time.monotonic()
    procs = {f"p{i}": peer(lab, i, f"p{i}", coordinator, keys) for i in (*PUBLIC, *NATTED)}
    results = {name: report(proc, timeout_s=150) for name, proc in procs.items()}
    reports = {name: r for name, (r, _) in results.items()}
    assert {n: r["rounds_committed"] for n, r in reports.items()} == dict.fromkeys(procs, ROUNDS), reports
    assert len({r["state_hash"] for r in reports.values()}) == 1, reports
    assert all(r["bytes_received"] > 0 for r in reports.values())
    for i in NATTED:
        log = results[f"p{i}"][1]
        assert "others cannot dial this peer" in log and "connection reversal" in log, log[-2000:]
    assert all("others cannot dial" not in results[f"p{i}"][1] for i in PUBLIC)
    # p3 and p4 reach each other only through the first public member, p1: it relayed their parts every round
    assert reports["p1"]["bytes_relayed"] > 0 and reports["p2"]["bytes_relayed"] == 0, reports
    assert time.monotonic() - started < 150


def test_a_peer_that_advertises_loopback_from_another_host_is_refused_with_what_to_do(
        lab: WanLab, keys: Path, coordinator: str) -> None:
    proc = lab.exec(1, swarm("peer", "--coordinator", coordinator, "--run-id", RUN, "--peer-id", "looped",
                             "--tls-dir", str(keys), "--task", "average", "--rounds", "1",
                             "--data-host", "127.0.0.1", "--retry-for-s", "5"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    text = err.decode()
    assert "advertises the loopback address" in text and "--advertise" in text, text[-2000:]
