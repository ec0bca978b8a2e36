"""The data plane over mutual TLS: only holders of the run's certificates get in, and each only as the peer
its certificate names. Real endpoints on 127.0.0.1:0, certificates made by `swarm.security`."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.compression import CodecConfig, Contribution, make_codec
from swarm.security.ca import init_ca, issue
from swarm.transport.endpoint import Endpoint, PeerFailure, StateSnapshot, TransportConfig
from swarm.transport.frames import Header, checksum, encode_header
from swarm.transport.links import TlsFiles, TlsLink

RUN = "tls-run"
MakeEndpoints = Callable[..., Awaitable[list[Endpoint]]]


def files(folder: Path, name: str) -> TlsFiles:
    return TlsFiles(ca=str(folder / "ca.crt"), cert=str(folder / f"{name}.crt"), key=str(folder / f"{name}.key"))


@pytest.fixture
def run_ca(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    init_ca(folder, RUN)
    for name in ("A", "B", "C", "X"):
        issue(folder, name)
    return folder


@pytest.fixture
async def make_endpoints(run_ca: Path) -> AsyncIterator[MakeEndpoints]:
    made: list[Endpoint] = []

    async def make(ids: str, folder: Path | None = None, cert_of: dict[str, str] | None = None) -> list[Endpoint]:
        eps = []
        for peer in ids:
            tls = files(folder or run_ca, (cert_of or {}).get(peer, peer))
            ep = Endpoint(peer, RUN, TransportConfig(tls=tls, io_timeout_s=2.0))
            made.append(ep)
            await ep.start()
            eps.append(ep)
        return eps

    yield make
    for ep in made:
        await ep.close()


async def allreduce(eps: list[Endpoint], xs: list[np.ndarray], round: int = 0) -> list[Any]:
    members = [Participant(e.peer_id, e.address) for e in eps]
    codec = make_codec(CodecConfig(name="int8"))
    return await asyncio.gather(*(allreduce_attempt(e, Contribution(torch.from_numpy(x), codec), members, round, 0, 5.0)
                                  for e, x in zip(eps, xs, strict=True)), return_exceptions=True)


async def raw_tls_client(ep: Endpoint, tls: TlsFiles, data: bytes) -> bool:
    """Connect with `tls`'s certificate, send `data`; whether the endpoint closed the connection."""
    loop = asyncio.get_running_loop()
    host, _, port = ep.address.rpartition(":")
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    link = TlsLink(sock, tls.contexts()[1], server_side=False)
    try:
        await asyncio.wait_for(link.handshake(), 2.0)
        await link.send(data)
        got = await asyncio.wait_for(link.recv_into(memoryview(bytearray(16))), 2.0)
        return got == 0
    except (OSError, ConnectionError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def hello(sender: str) -> bytes:
    return encode_header(Header(kind="hello", run=RUN, sender=sender))


def contrib(sender: str, round: int = 0) -> bytes:
    payload = np.arange(16, dtype=np.float32).tobytes()
    return encode_header(Header(kind="contrib", run=RUN, sender=sender, round=round, total=len(payload), tag="none",
                                nbytes=len(payload), checksum=checksum(payload))) + payload


async def test_an_allreduce_over_tls_gives_every_member_the_same_bytes(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC")
    xs = [np.random.default_rng(i).standard_normal(70_001).astype(np.float32) for i in range(3)]
    outs = await allreduce(eps, xs)
    assert all(isinstance(o, torch.Tensor) for o in outs), outs
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert all(e.bytes_sent > 0 for e in eps)


async def test_a_certified_peer_cannot_claim_another_peers_id(
    make_endpoints: MakeEndpoints, run_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await make_endpoints("A")
    # X holds a valid certificate of the run, says hello as B and pre-sends B's "contribution".
    assert await raw_tls_client(a, files(run_ca, "X"), hello("B") + contrib("B"))
    assert "the certificate of 'X' claims to be 'B'" in caplog.text
    assert not a._inboxes, "data from a spoofed id reached an inbox"


async def test_strangers_are_refused_before_they_can_say_anything(
    make_endpoints: MakeEndpoints, tmp_path: Path, run_ca: Path
) -> None:
    a, b = await make_endpoints("AB")
    other = tmp_path / "other"
    init_ca(other, RUN)  # the same run id, another CA
    issue(other, "B")
    assert await raw_tls_client(a, files(other, "B"), hello("B") + contrib("B"))
    # An expired certificate of the run's own CA.
    issue(run_ca, "late", ttl=dt.timedelta(minutes=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3))
    assert await raw_tls_client(a, files(run_ca, "late"), hello("late"))
    # Plain TCP to a TLS endpoint.
    host, _, port = a.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(hello("B") + contrib("B"))
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(), 3.0)
    except ConnectionError:
        data = b""
    assert data == b"", "the endpoint answered plain TCP"  # it closed the connection
    writer.close()
    assert not a._inboxes, "a stranger's data reached an inbox"
    xs = [np.ones(5000, np.float32), np.zeros(5000, np.float32)]
    outs = await allreduce([a, b], xs, round=1)
    assert all(isinstance(o, torch.Tensor) for o in outs), outs  # the endpoint kept serving


async def test_dialing_a_peer_whose_certificate_names_another_fails_that_peer(make_endpoints: MakeEndpoints) -> None:
    a, b = await make_endpoints("AB", cert_of={"B": "C"})  # B listens with C's certificate
    with pytest.raises(PeerFailure, match="certificate is 'C'") as caught:
        await a.dial("B", b.address)
    assert caught.value.peer == "B"


async def test_state_downloads_and_calls_run_over_tls(make_endpoints: MakeEndpoints) -> None:
    donor, joiner = await make_endpoints("AB")
    theta = np.arange(100_000, dtype=np.float32)
    donor.state_provider = lambda: StateSnapshot({"round": 3, "hash": "h"}, {"theta": theta})
    snap = await joiner.fetch_state("A", donor.address, timeout_s=10)
    assert snap.meta["round"] == 3 and np.array_equal(snap.arrays["theta"], theta)

    async def handler(asker: str, meta: dict, arrays: dict) -> tuple[dict, dict]:
        return {"asker": asker}, {"y": arrays["x"] * 2}

    donor.call_handler = handler
    meta, arrays = await joiner.call("A", donor.address, {}, {"x": theta}, timeout_s=10)
    assert meta == {"asker": "B"} and np.array_equal(arrays["y"], theta * 2)


async def test_a_peer_that_accepts_nothing_averages_over_tls_on_the_connections_it_dialed(
        make_endpoints: MakeEndpoints) -> None:
    """Connection reversal over TLS: A and B send to C on the connections C opened (issue 19)."""
    a, b, c = await make_endpoints("ABC")
    c.dials_out = True
    assert c._accept_task is not None and c._listener is not None
    c._accept_task.cancel()
    c._listener.close()
    members = [Participant("A", a.address), Participant("B", b.address), Participant("C", "")]
    await c.reach_out([("A", a.address), ("B", b.address)])
    codec = make_codec(CodecConfig(name="int8"))
    xs = [np.random.default_rng(i).standard_normal(20_001).astype(np.float32) for i in range(3)]
    outs = await asyncio.gather(*(allreduce_attempt(e, Contribution(torch.from_numpy(x), codec), members, 0, 0, 5.0)
                                  for e, x in zip((a, b, c), xs, strict=True)), return_exceptions=True)
    assert all(isinstance(o, torch.Tensor) for o in outs), outs
    assert all(torch.equal(outs[0], o) for o in outs[1:])
