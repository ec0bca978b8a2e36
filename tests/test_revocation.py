"""Revoked certificates (issue 18): `swarm keys revoke NAME` signs the run's crl.pem; the coordinator refuses
every call made with a revoked certificate within a second and hands the list to its peers, whose data planes
refuse the certificate too, even under a name issued again. Real servers and endpoints on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509

from swarm.coordinator.client import ClientConfig
from swarm.coordinator.server import RunningServer
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import HashState
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.security import COORDINATOR, CredentialError, ForeignCredential, init_ca, issue, revocation
from swarm.transport.endpoint import TransportConfig
from tests.conftest import FAST_CONFIG
from tests.test_coordinator_tls import _refused, raw_channel, snapshot  # noqa: F401 - raw_channel: a fixture
from tests.test_data_plane_tls import (  # noqa: F401 - make_endpoints and run_ca: fixtures
    allreduce,
    contrib,
    files,
    hello,
    make_endpoints,
    raw_tls_client,
    run_ca,
)

RUN = FAST_CONFIG["run_id"]


def serial(folder: Path, name: str) -> int:
    return x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes()).serial_number


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    init_ca(folder, RUN)
    for name in (COORDINATOR, "alice", "bob"):
        issue(folder, name)
    return folder


def test_revoking_lists_each_serial_once_in_a_list_only_the_runs_ca_verifies(keys: Path, tmp_path: Path) -> None:
    crl, first = revocation.revoke(keys, "alice")
    assert crl == keys / "crl.pem" and first == serial(keys, "alice")
    revocation.revoke(keys, "alice")  # again: still once
    _, second = revocation.revoke(keys, serial=12345)
    listed = revocation.load(crl.read_bytes(), (keys / "ca.crt").read_bytes())
    assert listed.serials == {first, second} and listed.digest
    assert listed.refuses((keys / "alice.crt").read_bytes()) and not listed.refuses((keys / "bob.crt").read_bytes())
    other = tmp_path / "other"
    init_ca(other, RUN)
    with pytest.raises(ForeignCredential, match="not signed by the run's CA"):
        revocation.load(crl.read_bytes(), (other / "ca.crt").read_bytes())
    for garbage in (b"", b"garbage", b"-----BEGIN X509 CRL-----\n" + b"A" * 10_000 + b"\n-----END X509 CRL-----\n"):
        with pytest.raises(CredentialError, match="is not a certificate revocation list"):
            revocation.load(garbage, (keys / "ca.crt").read_bytes(), "the coordinator's list")
    with pytest.raises(ValueError, match="does not exist"):
        revocation.revoke(keys, "nobody")
    with pytest.raises(ValueError, match="NAME"):
        revocation.revoke(keys)


def test_swarm_keys_revoke_says_what_it_did_and_refuses_what_it_cannot(keys: Path) -> None:
    cli = [sys.executable, "-m", "swarm.cli.main", "keys", "revoke"]
    done = subprocess.run([*cli, "bob", "--dir", str(keys)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and f"serial {serial(keys, 'bob'):x}" in done.stdout, done.stderr
    by_serial = subprocess.run([*cli, "--serial", "0xabc", "--dir", str(keys)], capture_output=True, text=True,
                               timeout=60, check=False)
    assert by_serial.returncode == 0, by_serial.stderr
    assert revocation.load((keys / "crl.pem").read_bytes(), (keys / "ca.crt").read_bytes()).serials == {
        serial(keys, "bob"), 0xABC}
    missing = subprocess.run([*cli, "carol", "--dir", str(keys)], capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "carol.crt does not exist" in missing.stderr


async def test_the_coordinator_refuses_a_revoked_certificate_and_hands_peers_the_list(
        keys: Path, server_factory: Callable, make_client: Callable,
        raw_channel: Callable) -> None:  # noqa: F811 - the imported fixture
    server: RunningServer = await server_factory(tls_dir=str(keys), lease_s=60.0, heartbeat_interval_s=1.0,
                                                 attempt_timeout_s=60.0, rendezvous_timeout_s=60.0)
    alice = make_client(server, "alice", tls_dir=str(keys))
    bob = make_client(server, "bob", tls_dir=str(keys))
    for client in (alice, bob):
        assert (await client.join("127.0.0.1:9")).crl_pem == b""
    assert (await bob.heartbeat()).crl_changed is False
    revocation.revoke(keys, "alice")
    await asyncio.sleep(1.1)  # the coordinator looks at crl.pem at most once a second
    before = snapshot(server)
    stub = raw_channel(server.port, keys / "ca.crt", keys / "alice.crt", keys / "alice.key")
    for call, request in (("Heartbeat", pb.HeartbeatRequest(run_id=RUN, peer_id="alice", incarnation=alice.incarnation)),
                          ("GetStatus", pb.GetStatusRequest())):
        error = await _refused(getattr(stub, call)(request, timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'alice' is revoked" in error.details()
    assert snapshot(server) == before
    # Bob is told the new list once, verifies it against the run's CA, and is not told again.
    reply = await bob.heartbeat()
    assert reply.crl_changed and revocation.load(reply.crl_pem, (keys / "ca.crt").read_bytes()).serials == {
        serial(keys, "alice")}
    held = revocation.load(reply.crl_pem, (keys / "ca.crt").read_bytes()).digest
    again = await bob.heartbeat(crl_digest=held)
    assert not again.crl_changed and again.crl_pem == b""
    # Alice with a new key under the same name is welcome again.
    issue(keys, "alice", force=True)
    fresh = raw_channel(server.port, keys / "ca.crt", keys / "alice.crt", keys / "alice.key")
    await fresh.GetStatus(pb.GetStatusRequest(), timeout=5)


async def test_a_list_not_signed_by_the_runs_ca_stops_the_coordinator_before_it_serves(
        keys: Path, tmp_path: Path, server_factory: Callable) -> None:
    other = tmp_path / "other"
    init_ca(other, RUN)
    issue(other, "x")
    revocation.revoke(other, "x")
    (keys / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(ForeignCredential, match="crl.pem is not signed by the run's CA"):
        await server_factory(tls_dir=str(keys))


async def test_a_revoked_certificate_is_refused_on_the_data_plane_even_under_a_reissued_name(
        keys: Path, make_endpoints: Callable) -> None:  # noqa: F811 - the imported fixture
    issue(keys, "A")
    issue(keys, "B")
    a, b = await make_endpoints("AB", folder=keys)
    leaked = keys / "leaked"
    leaked.mkdir()
    for suffix in ("crt", "key"):  # the thief's copy of B's first key
        (leaked / f"B.{suffix}").write_bytes((keys / f"B.{suffix}").read_bytes())
        (leaked / f"B.{suffix}").chmod(0o600)
    (leaked / "ca.crt").write_bytes((keys / "ca.crt").read_bytes())
    revocation.revoke(keys, "B")
    issue(keys, "B", force=True)  # B's owner gets a new key under the same name
    a.revocations = revocation.load((keys / "crl.pem").read_bytes(), (keys / "ca.crt").read_bytes())
    assert await raw_tls_client(a, files(leaked, "B"), hello("B") + contrib("B"))
    assert not a._inboxes, "data from a revoked certificate reached an inbox"
    # The real B, on a new endpoint with its new key, still averages with A.
    (b2,) = await make_endpoints("B", folder=keys)
    xs = [np.ones(5000, np.float32), np.zeros(5000, np.float32)]
    outs = await allreduce([a, b2], xs, round=1)
    assert all(isinstance(o, torch.Tensor) for o in outs), outs
    # And A, told B's old certificate is revoked, will not send to an endpoint that still shows it.
    with pytest.raises(Exception, match="revoked"):
        await a.dial("B", b.address)


async def test_a_peer_takes_the_list_from_its_heartbeats_and_its_data_plane_enforces_it(
        keys: Path, server_factory: Callable) -> None:
    server = await server_factory(tls_dir=str(keys), lease_s=60.0, heartbeat_interval_s=0.1)
    client = ClientConfig(target=f"127.0.0.1:{server.port}", run_id=RUN, peer_id="bob", tls_dir=str(keys))
    bob = Peer(PeerConfig(client=client, address="127.0.0.1:0",
                          transport=TransportConfig(tls=files(keys, "bob"))))
    await bob.start(HashState())
    try:
        assert bob.endpoint is not None and bob.endpoint.revocations.serials == frozenset()
        revocation.revoke(keys, "alice")
        async with asyncio.timeout(10):
            while serial(keys, "alice") not in bob.endpoint.revocations.serials:
                await asyncio.sleep(0.05)
        # The list it holds is the coordinator's, verified: the next heartbeats do not carry it again.
        assert bob.endpoint.revocations.pem == (keys / "crl.pem").read_bytes()
        assert not bob.report.errors
    finally:
        await bob.close("done")
