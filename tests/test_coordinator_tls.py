"""The coordinator over mutual TLS (issue 18): only certificates of the run's CA get in, each acts only as
its own peer id, and a coordinator on a public address refuses to serve plaintext unless told to.

Real servers on 127.0.0.1:0; refused clients are built from raw gRPC credentials where the client library
would refuse the same files itself before dialling (an expired certificate)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.coordinator.server import RunningServer, preflight
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import COORDINATOR, ExpiredCredential, MissingCredential, init_ca, issue
from swarm.security.tls import CHANNEL_OPTIONS
from swarm.utils import is_loopback
from tests.conftest import FAST_CONFIG, StartCoordinator

RUN = FAST_CONFIG["run_id"]
NOW = dt.datetime.now(dt.UTC)
SWARM = [sys.executable, "-m", "swarm.cli.main"]
HASH = "abcdef0123456789"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's CA folder (coordinator, alice, bob, and carol whose certificate expired) and another CA's
    folder for the same run id (alice, coordinator)."""
    run = tmp_path_factory.mktemp("keys")
    init_ca(run, RUN, now=NOW - dt.timedelta(days=30))
    for name in (COORDINATOR, "alice", "bob"):
        issue(run, name)
    issue(run, "carol", dt.timedelta(days=1), now=NOW - dt.timedelta(days=20))
    other = tmp_path_factory.mktemp("other")
    init_ca(other, RUN)
    for name in (COORDINATOR, "alice"):
        issue(other, name)
    return {"run": run, "other": other}


def snapshot(srv: RunningServer) -> tuple[dict, dict, dict, list]:
    """Copies of everything a request could change: members, rounds, tombstones, decision log."""
    state = srv.core.state
    return dict(state.members), dict(state.rounds), dict(state.tombstones), list(srv.core.events)


@pytest.fixture
async def tls_server(server_factory: Callable, keys: dict[str, Path]) -> RunningServer:
    # Long leases and deadlines: no tick may change the state while a test compares it.
    return await server_factory(tls_dir=str(keys["run"]), lease_s=60.0, heartbeat_interval_s=1.0,
                                attempt_timeout_s=60.0, rendezvous_timeout_s=60.0)


@pytest.fixture
async def raw_channel() -> AsyncIterator[Callable[..., pb_grpc.CoordinatorStub]]:
    """Factory: a raw stub to `port` showing the given PEM files (a client the library would not build)."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> pb_grpc.CoordinatorStub:
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                             cert.read_bytes() if cert else None)
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=CHANNEL_OPTIONS)
        channels.append(channel)
        return pb_grpc.CoordinatorStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


def _join_request(peer_id: str) -> pb.JoinRequest:
    return pb.JoinRequest(run_id=RUN, peer_id=peer_id, protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9",
                          incarnation="intruder")


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ------------------------------------------------------------------ who gets in


async def test_a_peer_with_a_certificate_of_the_run_joins_and_runs_a_round(
        tls_server: RunningServer, make_client: Callable, keys: dict[str, Path]) -> None:
    alice = make_client(tls_server, "alice", tls_dir=str(keys["run"]))
    bob = make_client(tls_server, "bob", tls_dir=str(keys["run"]))
    for client in (alice, bob):
        await client.join("127.0.0.1:9")
        await client.heartbeat()
    assert sorted(tls_server.core.state.members) == ["alice", "bob"]
    started = [await alice.rendezvous(0, 0, wait_s=0.1), await bob.rendezvous(0, 0, wait_s=5.0)]
    assert started[-1].outcome == pb.RendezvousReply.STARTED
    await alice.commit(0, 0, started[-1].attempt.number, HASH, wait_s=0.1)
    done = await bob.commit(0, 0, started[-1].attempt.number, HASH, wait_s=5.0)
    assert done.outcome == pb.CommitRoundReply.OK and done.committed_hash == HASH
    assert [m.member.peer_id for m in (await alice.status()).members] == ["alice", "bob"]
    await bob.leave("done")
    assert sorted(tls_server.core.state.members) == ["alice"]


async def test_a_certificate_works_whatever_address_the_peer_dials(
        tls_server: RunningServer, make_client: Callable, keys: dict[str, Path]) -> None:
    # The client checks the coordinator's certificate against the name `coordinator`, not the address.
    alice = make_client(f"localhost:{tls_server.port}", "alice", tls_dir=str(keys["run"]), run_id=RUN)
    assert (await alice.join("127.0.0.1:9")).lease_s == 60.0


async def test_a_client_without_a_certificate_is_refused_and_changes_nothing(
        tls_server: RunningServer, make_client: Callable, raw_channel: Callable, keys: dict[str, Path]) -> None:
    before = snapshot(tls_server)
    plaintext = make_client(tls_server, "alice", retry_for_s=0.3)
    with pytest.raises(CoordinatorCallError) as info:
        await plaintext.join("127.0.0.1:9")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # TLS that trusts the run's CA but shows no certificate of its own.
    stub = raw_channel(tls_server.port, keys["run"] / "ca.crt")
    error = await _refused(stub.Join(_join_request("alice"), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert snapshot(tls_server) == before


async def test_a_certificate_of_another_runs_ca_is_refused(
        tls_server: RunningServer, raw_channel: Callable, keys: dict[str, Path]) -> None:
    before = snapshot(tls_server)
    other = keys["other"]
    stub = raw_channel(tls_server.port, keys["run"] / "ca.crt", other / "alice.crt", other / "alice.key")
    for call in (stub.Join(_join_request("alice"), timeout=5), stub.GetStatus(pb.GetStatusRequest(), timeout=5)):
        assert (await _refused(call)).code() == grpc.StatusCode.UNAVAILABLE
    assert snapshot(tls_server) == before


async def test_an_expired_certificate_is_refused_by_the_coordinator_and_by_the_client_itself(
        tls_server: RunningServer, raw_channel: Callable, keys: dict[str, Path]) -> None:
    before = snapshot(tls_server)
    run = keys["run"]
    stub = raw_channel(tls_server.port, run / "ca.crt", run / "carol.crt", run / "carol.key")
    assert (await _refused(stub.Join(_join_request("carol"), timeout=5))).code() == grpc.StatusCode.UNAVAILABLE
    assert snapshot(tls_server) == before
    with pytest.raises(ExpiredCredential, match=r"carol\.crt expired"):
        ClientConfig(target=f"127.0.0.1:{tls_server.port}", run_id=RUN, peer_id="carol", tls_dir=str(run))


async def test_a_client_refuses_a_coordinator_whose_certificate_is_not_of_its_run(
        server_factory: Callable, make_client: Callable, keys: dict[str, Path]) -> None:
    # A fake coordinator (another CA's certificate) never sees the peer's requests.
    fake = await server_factory(tls_dir=str(keys["other"]))
    alice = make_client(fake, "alice", tls_dir=str(keys["run"]), retry_for_s=0.3)
    with pytest.raises(CoordinatorCallError, match="TLS handshake failed") as info:
        await alice.join("127.0.0.1:9")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert not fake.core.state.members


def test_a_peer_id_without_a_certificate_is_a_clear_error(keys: dict[str, Path]) -> None:
    with pytest.raises(MissingCredential, match=r"dave\.crt: issue it with `swarm keys issue dave`"):
        ClientConfig(target="127.0.0.1:1", run_id=RUN, peer_id="dave", tls_dir=str(keys["run"]))


# ------------------------------------------------------------------ who it acts as


def _as_bob(rpc: str, bob: CoordinatorClient) -> Any:
    ids = {"run_id": RUN, "peer_id": "bob", "incarnation": bob.incarnation}
    return {
        "Join": pb.JoinRequest(protocol_version=PROTOCOL_VERSION, address="10.0.0.66:9", **ids),
        "Heartbeat": pb.HeartbeatRequest(**ids),
        "Leave": pb.LeaveRequest(reason="forged", **ids),
        "Rendezvous": pb.RendezvousRequest(stage=0, round=0, wait_s=0.0, **ids),
        "ReportFailure": pb.ReportFailureRequest(stage=0, round=0, attempt=1, suspect="alice", reason="forged",
                                                 wait_s=0.0, **ids),
        "CommitRound": pb.CommitRoundRequest(stage=0, round=0, attempt=1, state_hash="0" * 16, wait_s=0.0, **ids),
    }[rpc]


IMPERSONATED = ["Join", "Heartbeat", "Leave", "Rendezvous", "ReportFailure", "CommitRound"]


def test_every_rpc_that_names_a_peer_is_checked_here() -> None:
    # A new RPC carrying a peer_id must join the impersonation test below.
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    naming = sorted(m.name for m in service.methods if "peer_id" in m.input_type.fields_by_name)
    assert naming == sorted(IMPERSONATED)


@pytest.mark.parametrize("rpc", IMPERSONATED)
async def test_a_certified_peer_cannot_act_as_another_and_changes_nothing(
        rpc: str, tls_server: RunningServer, make_client: Callable, raw_channel: Callable,
        keys: dict[str, Path]) -> None:
    run = keys["run"]
    alice = make_client(tls_server, "alice", tls_dir=str(run))
    bob = make_client(tls_server, "bob", tls_dir=str(run))
    for client in (alice, bob):
        await client.join("127.0.0.1:9")
    before = snapshot(tls_server)
    stub = raw_channel(tls_server.port, run / "ca.crt", run / "alice.crt", run / "alice.key")
    error = await _refused(getattr(stub, rpc)(_as_bob(rpc, bob), timeout=5))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'alice'" in error.details() and "'bob'" in error.details()
    assert snapshot(tls_server) == before
    # Acting as itself still works on the same connection, and anyone certified may read the status.
    request = _as_bob("Heartbeat", bob)
    request.peer_id, request.incarnation = "alice", alice.incarnation
    await stub.Heartbeat(request, timeout=5)
    assert {m.member.peer_id for m in (await stub.GetStatus(pb.GetStatusRequest(), timeout=5)).members} == \
        {"alice", "bob"}


# ------------------------------------------------------------------ the safe default


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])
def test_only_loopback_addresses_count_as_private(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_preflight_allows_plaintext_on_loopback_or_when_told_to() -> None:
    assert preflight(CoordinatorConfig(), "127.0.0.1") is None
    assert preflight(CoordinatorConfig(insecure=True), "0.0.0.0") is None
    with pytest.raises(ValueError, match="without TLS"):
        preflight(CoordinatorConfig(), "0.0.0.0")


def _coordinator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWARM, "coordinator", "--port", "0", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_coordinator_on_a_public_address_refuses_plaintext_before_listening(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    result = _coordinator("--host", "0.0.0.0", "--db", str(db))
    assert result.returncode == 2
    assert result.stdout == ""  # never printed `listening`
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("swarm coordinator: refusing to serve run 'default' on 0.0.0.0 without TLS")
    assert "--tls-dir" in err and "--insecure" in err
    assert not db.exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--insecure", "--tls-dir", "x"], "not both"),
    (["--tls-dir", "{missing}"], "missing {missing}/ca.crt"),
])
def test_bad_tls_settings_are_one_line_and_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    missing = str(tmp_path / "nokeys")
    result = _coordinator("--host", "0.0.0.0", *(a.format(missing=missing) for a in args))
    assert result.returncode == 2 and result.stdout == ""
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and says.format(missing=missing) in err, err


@pytest.mark.slow
def test_swarm_peer_joins_a_coordinator_over_tls_with_its_certificate(
        coordinator_proc: StartCoordinator, keys: dict[str, Path]) -> None:
    run = str(keys["run"])
    coord = coordinator_proc(extra_args=["--tls-dir", run, "--run-id", RUN])
    peer = [*SWARM, "peer", "--coordinator", coord.target, "--run-id", RUN, "--tls-dir", run, "--task", "control",
            "--rounds", "2", "--work-s", "0.01", "--retry-for-s", "5"]
    good = subprocess.run([*peer, "--peer-id", "alice"], capture_output=True, text=True, timeout=120, check=False)
    assert good.returncode == 0, good.stderr[-2000:]
    assert '"rounds_committed": 2' in good.stdout
    missing = subprocess.run([*peer, "--peer-id", "dave"], capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(f"swarm peer: missing {run}/dave.crt"), missing.stderr
    unnamed = subprocess.run(peer, capture_output=True, text=True, timeout=120, check=False)
    assert unnamed.returncode == 2 and "--tls-dir needs --peer-id" in unnamed.stderr


@pytest.mark.slow
def test_two_peers_average_over_tls_on_both_planes_and_end_identical(
        coordinator_proc: StartCoordinator, keys: dict[str, Path]) -> None:
    """alice and bob all-reduce over the data plane with their certificates: every round commits and both
    end with the same state hash (the data plane refuses anyone else, tests/test_data_plane_tls.py)."""
    run = str(keys["run"])
    # Both must be in round 0: with one, the other would join a run in progress (another test's subject).
    coord = coordinator_proc(extra_args=["--tls-dir", run, "--run-id", RUN, "--min-peers", "2"])
    procs = [subprocess.Popen([*SWARM, "peer", "--coordinator", coord.target, "--run-id", RUN, "--tls-dir", run,
                               "--peer-id", name, "--task", "average", "--numel", "50000", "--rounds", "3",
                               "--work-s", "0.05", "--retry-for-s", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("alice", "bob")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    hashes = {line.split('"state_hash": "')[1][:64] for out, _ in outs for line in out.splitlines()
              if '"state_hash": "' in line}
    assert all('"rounds_committed": 3' in out for out, _ in outs), outs
    assert len(hashes) == 1, hashes
