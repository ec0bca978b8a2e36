"""Join tokens (issue 18): `swarm token create/revoke`, the coordinator's enrollment listener, and a peer that
starts with nothing but a token. A refused token changes nothing: no file written, no use counted.

Real coordinators on 127.0.0.1:0 (in-process for the refusals, a subprocess for the end-to-end run)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swarm.coordinator.client import enroll_over_grpc
from swarm.coordinator.server import RunningServer
from swarm.coordinator.store import MemoryStore, SqliteStore, Store
from swarm.security import COORDINATOR, CredentialError, init_ca, issue, load_identity
from swarm.security.issuer import Issuer
from swarm.security.join import enroll_address, join_with_token
from swarm.security.tokens import (
    Enrollment,
    InvalidToken,
    TokenRefused,
    decide_enrollment,
    make_token,
    read_claims,
    revoke,
    verify_token,
)
from tests.conftest import FAST_CONFIG, StartCoordinator

RUN = FAST_CONFIG["run_id"]
NOW = dt.datetime.now(dt.UTC)
SWARM = [sys.executable, "-m", "swarm.cli.main"]


def make_ca(folder: Path, run_id: str = RUN) -> Path:
    """A run CA with the coordinator's pair, in `folder` (also the coordinator's --tls-dir: it holds ca.key)."""
    init_ca(folder, run_id)
    issue(folder, COORDINATOR)
    return folder


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return make_ca(tmp_path / "ca")


# ------------------------------------------------------------------ the token itself (pure)


def test_a_token_verifies_with_its_cas_key_and_says_what_it_was_made_for(ca: Path) -> None:
    issuer = Issuer.load(ca)
    token, claims = issuer.create_token(dt.timedelta(hours=24), 3, enroll=":7071", now=NOW)
    assert verify_token(token, issuer.key) == claims == read_claims(token)
    assert (claims.run_id, claims.max_uses, claims.enroll) == (RUN, 3, ":7071")
    assert abs(claims.expires_at - (NOW + dt.timedelta(hours=24)).timestamp()) <= 1
    assert claims.ca_pem == (ca / "ca.crt").read_bytes()


def test_an_altered_or_foreign_token_does_not_verify(ca: Path, tmp_path: Path) -> None:
    issuer = Issuer.load(ca)
    token, _ = issuer.create_token(dt.timedelta(hours=1), 1)
    prefix, payload, mac = token.split(".")
    altered = f"{prefix}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
    other = Issuer.load(make_ca(tmp_path / "other"))  # the same run id, another CA
    foreign, _ = other.create_token(dt.timedelta(hours=1), 1)
    for bad in (altered, foreign, f"{prefix}.{payload}.", "hello"):
        with pytest.raises(InvalidToken):
            verify_token(bad, issuer.key)


def _decide(issuer: Issuer, *, ttl_h: float = 1, max_uses: int = 1, **kw: object):
    _, claims = issuer.create_token(dt.timedelta(hours=ttl_h), max_uses, now=NOW)
    args: dict = {"run_id": RUN, "name": "dave", "key_sha256": "k1", "now_s": NOW.timestamp(), "uses": 0,
                  "revoked": frozenset(), "previous": None, "live_member": False}
    args.update(kw)
    if callable(args["revoked"]):
        args["revoked"] = args["revoked"](claims.token_id)
    return decide_enrollment(claims, **args)


def test_the_decision_refuses_expired_revoked_used_up_foreign_and_taken_names_with_a_reason(ca: Path) -> None:
    issuer = Issuer.load(ca)
    assert _decide(issuer).ok and _decide(issuer).count_use
    expired = _decide(issuer, now_s=(NOW + dt.timedelta(hours=2)).timestamp())
    assert not expired.ok and "expired" in expired.reason
    revoked = _decide(issuer, revoked=lambda tid: frozenset({tid}))
    assert not revoked.ok and "revoked" in revoked.reason
    used_up = _decide(issuer, max_uses=2, uses=2)
    assert not used_up.ok and "used up (2 of 2" in used_up.reason
    foreign = _decide(issuer, run_id="another-run")
    assert not foreign.ok and "is for run 'test-run'" in foreign.reason
    live = _decide(issuer, live_member=True)
    assert not live.ok and "live member" in live.reason
    taken = _decide(issuer, previous=Enrollment("dave", "0" * 16, "k0", 0.0))
    assert not taken.ok and "another key" in taken.reason
    # The same name and key again (a lost reply): issued again, no use spent, even when the token is used up.
    again = _decide(issuer, uses=1, previous=Enrollment("dave", "0" * 16, "k1", 0.0))
    assert again.ok and not again.count_use


def test_the_enrollment_address_is_the_tokens_or_the_coordinators_port_plus_one(ca: Path) -> None:
    issuer = Issuer.load(ca)
    plain = read_claims(issuer.create_token(dt.timedelta(hours=1))[0])
    port_only = read_claims(issuer.create_token(dt.timedelta(hours=1), enroll=":9000")[0])
    full = read_claims(issuer.create_token(dt.timedelta(hours=1), enroll="enroll.example:9001")[0])
    assert enroll_address(plain, "coord.example:7070") == "coord.example:7071"
    assert enroll_address(port_only, "coord.example:7070") == "coord.example:9000"
    assert enroll_address(full, "coord.example:7070") == "enroll.example:9001"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_token_uses_are_counted_per_name_and_sqlite_keeps_them_across_a_restart(kind: str, tmp_path: Path) -> None:
    def open_store() -> Store:
        return MemoryStore(RUN) if kind == "memory" else SqliteStore(tmp_path / "run.db", RUN)

    store = open_store()
    assert store.token_uses("a" * 16) == 0 and store.enrollment("dave") is None
    store.record_enrollment(Enrollment("dave", "a" * 16, "k1", 1.0))
    store.record_enrollment(Enrollment("erin", "a" * 16, "k2", 2.0))
    store.record_enrollment(Enrollment("fred", "b" * 16, "k3", 3.0))
    assert store.token_uses("a" * 16) == 2 and store.enrollment("dave") == Enrollment("dave", "a" * 16, "k1", 1.0)
    if kind == "sqlite":
        store.close()
        store = open_store()
        assert store.token_uses("a" * 16) == 2 and store.enrollment("erin") == Enrollment("erin", "a" * 16, "k2", 2.0)
    store.close()


# ------------------------------------------------------------------ the CLI


def test_token_cli_creates_and_revokes_and_reports_bad_input_in_one_line(ca: Path, tmp_path: Path) -> None:
    created = subprocess.run([*SWARM, "token", "create", "--dir", str(ca), "--ttl", "2h", "--max-uses", "2"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    claims = read_claims(token)
    assert claims.max_uses == 2 and claims.token_id in created.stderr
    revoked = subprocess.run([*SWARM, "token", "revoke", claims.token_id, "--dir", str(ca)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert revoked.returncode == 0, revoked.stderr
    revoked_file = ca / "revoked-tokens"
    assert revoked_file.read_text().split() == [claims.token_id]
    assert stat.S_IMODE(revoked_file.stat().st_mode) == 0o600
    for args, why in ((["create", "--dir", str(tmp_path / "nowhere")], "missing"),
                      (["create", "--dir", str(ca), "--ttl", "soon"], "--ttl"),
                      (["create", "--dir", str(ca), "--max-uses", "0"], "--max-uses"),
                      (["revoke", "not-an-id", "--dir", str(ca)], "not a token id")):
        bad = subprocess.run([*SWARM, "token", *args], capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and why in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# ------------------------------------------------------------------ enrollment against a real coordinator


@pytest.fixture
async def enrolling(server_factory: Callable, ca: Path) -> RunningServer:
    srv = await server_factory(tls_dir=str(ca), enroll_port=0, lease_s=60.0, heartbeat_interval_s=1.0)
    assert srv.enroll_port
    return srv


async def _join(srv: RunningServer, token: str, folder: Path, name: str) -> bool:
    # A blocking call, as the peer makes it before its event loop: off this test's loop, which serves it.
    return await asyncio.to_thread(join_with_token, token, send=enroll_over_grpc, coordinator=f"127.0.0.1:{srv.port}",
                                   folder=folder, name=name, timeout_s=10.0)


async def test_a_token_gets_a_certificate_that_loads_as_an_identity(enrolling: RunningServer, ca: Path,
                                                                    tmp_path: Path) -> None:
    token, claims = Issuer.load(ca).create_token(dt.timedelta(hours=1), 2, enroll=f":{enrolling.enroll_port}")
    folder = tmp_path / "dave-keys"
    assert await _join(enrolling, token, folder, "dave")
    identity = load_identity(folder, "dave", run_id=RUN)
    assert identity.name == "dave"
    assert stat.S_IMODE((folder / "dave.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert enrolling.core.store.token_uses(claims.token_id) == 1
    # The certificate is there: a restart sends nothing and spends nothing.
    assert not await _join(enrolling, token, folder, "dave")
    assert enrolling.core.store.token_uses(claims.token_id) == 1


async def test_a_lost_reply_is_retried_with_the_same_key_without_spending_a_use(enrolling: RunningServer, ca: Path,
                                                                              tmp_path: Path) -> None:
    token, claims = Issuer.load(ca).create_token(dt.timedelta(hours=1), 1, enroll=f":{enrolling.enroll_port}")
    folder = tmp_path / "erin-keys"
    assert await _join(enrolling, token, folder, "erin")
    (folder / "erin.crt").unlink()  # the reply never reached the disk; the key did
    assert await _join(enrolling, token, folder, "erin")
    assert enrolling.core.store.token_uses(claims.token_id) == 1
    # Another key for the same name is refused, even with a fresh token.
    other, _ = Issuer.load(ca).create_token(dt.timedelta(hours=1), 1, enroll=f":{enrolling.enroll_port}")
    with pytest.raises(TokenRefused, match="already issued to another key"):
        await _join(enrolling, other, tmp_path / "fake-erin", "erin")
    assert not (tmp_path / "fake-erin").exists()


@pytest.mark.parametrize("case", ["expired", "revoked", "used up", "forged", "other run"])
async def test_a_refused_token_writes_nothing_and_counts_nothing(case: str, enrolling: RunningServer, ca: Path,
                                                                 tmp_path: Path) -> None:
    port = f":{enrolling.enroll_port}"
    issuer = Issuer.load(ca)
    token, claims = issuer.create_token(dt.timedelta(hours=1), 1, enroll=port)
    match = {"expired": "expired", "revoked": "revoked", "used up": "used up", "forged": "does not verify",
             "other run": "does not verify"}[case]
    if case == "expired":
        token, claims = issuer.create_token(dt.timedelta(minutes=1), 1, enroll=port,
                                            now=NOW - dt.timedelta(minutes=2))
    elif case == "revoked":
        revoke(ca, claims.token_id)
    elif case == "used up":
        assert await _join(enrolling, token, tmp_path / "first", "first")
    elif case == "forged":  # the claims rewritten to 100 uses, the genuine MAC kept
        claims = dataclasses.replace(claims, max_uses=100)
        token = make_token(claims, b"\0" * 32).rpartition(".")[0] + "." + token.rpartition(".")[2]
    else:  # made with another run's CA key (carrying this run's ca.crt, so the peer gets to send it)
        other = Issuer.load(make_ca(tmp_path / "other", "other-run"))
        claims = dataclasses.replace(other.create_token(dt.timedelta(hours=1), 1, enroll=port)[1],
                                     ca_pem=issuer.ca_pem)
        token = make_token(claims, other.key)
    uses = enrolling.core.store.token_uses(claims.token_id)
    folder = tmp_path / "mallory-keys"
    with pytest.raises(TokenRefused, match=match):
        await _join(enrolling, token, folder, "mallory")
    assert not folder.exists()  # no key, no certificate, no ca.crt
    assert enrolling.core.store.token_uses(claims.token_id) == uses
    assert enrolling.core.store.enrollment("mallory") is None


async def test_a_peer_does_not_send_its_request_to_a_coordinator_of_another_ca(enrolling: RunningServer,
                                                                              tmp_path: Path) -> None:
    token, _ = Issuer.load(make_ca(tmp_path / "other")).create_token(dt.timedelta(hours=1), 1,
                                                                    enroll=f":{enrolling.enroll_port}")
    with pytest.raises(CredentialError, match="not of the run CA in the token"):
        await asyncio.to_thread(join_with_token, token, send=enroll_over_grpc,
                                coordinator=f"127.0.0.1:{enrolling.port}", folder=tmp_path / "k", name="hank",
                                timeout_s=1.0)
    assert not (tmp_path / "k").exists() and enrolling.core.store.enrollment("hank") is None


def test_enrollment_needs_the_cas_key_in_the_coordinators_tls_dir(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    coord = tmp_path / "coord"
    coord.mkdir()
    for name in ("ca.crt", "coordinator.crt", "coordinator.key"):
        (coord / name).write_bytes((ca / name).read_bytes())
    os.chmod(coord / "coordinator.key", 0o600)
    proc = subprocess.run([*SWARM, "coordinator", "--port", "0", "--run-id", RUN, "--tls-dir", str(coord),
                           "--enroll-port", "0"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--enroll-port signs certificates with the run CA's key" in proc.stderr and "ca.key" in proc.stderr
    plain = subprocess.run([*SWARM, "coordinator", "--port", "0", "--enroll-port", "0"], capture_output=True,
                           text=True, timeout=60, check=False)
    assert plain.returncode == 2 and "enroll_port needs coordinator.tls_dir" in plain.stderr


@pytest.mark.slow
def test_a_peer_with_only_a_token_enrolls_then_runs_control_rounds_over_mutual_tls(
        coordinator_proc: StartCoordinator, ca: Path, tmp_path: Path) -> None:
    coord = coordinator_proc(extra_args=["--tls-dir", str(ca), "--run-id", RUN, "--enroll-port", "0"])
    found = re.search(r"join-token enrollment on 127\.0\.0\.1:(\d+)", coord.stderr())
    assert found, coord.stderr()
    token = subprocess.run([*SWARM, "token", "create", "--dir", str(ca), "--ttl", "1h", "--enroll",
                            f":{found[1]}"], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    folder = tmp_path / "gina-keys"
    # No --run-id: the token names the run; the token comes through the environment, out of `ps`.
    env = {**os.environ, "SWARM_JOIN_TOKEN": token}
    peer = [*SWARM, "peer", "--coordinator", coord.target, "--peer-id", "gina", "--tls-dir", str(folder),
            "--task", "control", "--rounds", "2", "--work-s", "0.05", "--retry-for-s", "10"]
    started = time.monotonic()
    proc = subprocess.run(peer, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "enrolled 'gina'" in proc.stderr and '"rounds_committed": 2' in proc.stdout, proc.stdout
    assert load_identity(folder, "gina", run_id=RUN).name == "gina"
    # Started again, it uses its files and does not spend the token (which had a single use).
    again = subprocess.run(peer, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert again.returncode == 0 and "enrolled" not in again.stderr, again.stderr[-3000:]
    assert time.monotonic() - started < 120
