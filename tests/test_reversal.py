"""Connection reversal (issue 19): a peer that accepts no inbound connection still takes part by dialing the
others, who send back on what it dialed. Endpoints on 127.0.0.1:0; the dial-out peer's listener is closed
before the round, so any attempt to dial it fails the test."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

from swarm.allreduce.butterfly import Participant
from swarm.peer.attempts import relay_for
from swarm.transport import relay
from swarm.transport.endpoint import Endpoint, PeerFailure
from tests.test_endpoint import MakeEndpoints, assert_exact_mean, inputs, make_endpoints, members, run_all

__all__ = ["make_endpoints"]  # the fixture, used by name


async def behind_nat(ep: Endpoint) -> None:
    """Make `ep` accept nothing, as a peer behind NAT does, and dial out instead."""
    ep.dials_out = True
    assert ep._accept_task is not None and ep._listener is not None
    ep._accept_task.cancel()
    await asyncio.gather(ep._accept_task, return_exceptions=True)
    ep._listener.close()


def as_others_see(eps: list[Endpoint]) -> list[Participant]:
    """The members as the coordinator gives them: no address for a peer that dials out."""
    return [Participant(m.peer_id, "" if ep.dials_out else m.address, m.bandwidth)
            for ep, m in zip(eps, members(eps), strict=True)]


async def test_a_peer_that_accepts_nothing_averages_with_peers_it_can_dial(make_endpoints: MakeEndpoints) -> None:
    a, b, n = await make_endpoints("ABN", connections_per_peer=2)
    await behind_nat(n)
    group = as_others_see([a, b, n])
    await n.reach_out([(m.peer_id, m.address) for m in group if m.address and m.peer_id != n.peer_id])
    for _ in range(100):  # A and B adopt them as each hello arrives
        if len(a._conns.get("N", [])) == len(b._conns.get("N", [])) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(a._conns["N"]) == len(b._conns["N"]) == 2, "N dialed its two lanes to each peer ahead"
    for round in range(3):  # and again over the same connections
        xs = inputs(3, 10_000, seed=round)
        assert_exact_mean(await run_all([a, b, n], xs, group, round=round), xs)
    assert n.bytes_received > 0 and len(a._conns["N"]) == 2


async def test_without_reaching_out_first_the_peers_wait_for_its_connections(make_endpoints: MakeEndpoints) -> None:
    """The lazy path: nobody dialed ahead; A and B's sends to N wait until N's own sends have dialed them."""
    a, b, n = await make_endpoints("ABN")
    await behind_nat(n)
    xs = inputs(3, 5_000)
    assert_exact_mean(await run_all([a, b, n], xs, as_others_see([a, b, n]), start_after_s={"N": 0.3}), xs)


async def test_two_peers_that_both_accept_nothing_fail_each_other_clearly_and_in_time(
        make_endpoints: MakeEndpoints) -> None:
    a, n, m = await make_endpoints("ANM", connect_timeout_s=0.5)
    await behind_nat(n)
    await behind_nat(m)
    outcomes = await run_all([a, n, m], inputs(3, 1_000), as_others_see([a, n, m]), timeout_s=5.0)
    for peer, other in (("N", "M"), ("M", "N")):
        error = outcomes[peer].error
        assert isinstance(error, PeerFailure) and error.peer == other, outcomes[peer]
        assert "need a relay" in error.reason
        assert outcomes[peer].elapsed_s < 3.0


async def test_when_the_other_side_closes_an_idle_connection_the_next_attempt_dials_again(
        make_endpoints: MakeEndpoints) -> None:
    a, n = await make_endpoints("AN", io_timeout_s=0.2, idle_timeout_s=0.5)
    await behind_nat(n)
    group = as_others_see([a, n])
    xs = inputs(2, 2_000)
    assert_exact_mean(await run_all([a, n], xs, group, round=0), xs)
    await asyncio.sleep(1.0)  # A's reader closes N's connection, idle
    assert not a._conns.get("N") and not n._conns.get("A"), "both sides stopped sending on the closed connection"
    await n.reach_out([("A", a.address)])
    xs = inputs(2, 2_000, seed=1)
    assert_exact_mean(await run_all([a, n], xs, group, round=1), xs)


async def test_two_peers_that_accept_nothing_meet_through_a_relay_and_average_exactly(
        make_endpoints: MakeEndpoints) -> None:
    a, b, n, m = await make_endpoints("ABNM", connections_per_peer=2)
    for ep in (n, m):
        await behind_nat(ep)
    group = as_others_see([a, b, n, m])
    relay_address = relay_for(group)
    assert relay_address == a.address
    for round in range(2):
        await asyncio.gather(*(ep.reach_out([(p.peer_id, p.address) for p in group if p.peer_id != ep.peer_id],
                                            relay_address) for ep in (n, m)))
        xs = inputs(4, 20_000, seed=round)
        assert_exact_mean(await run_all([a, b, n, m], xs, group, round=round), xs)
    # N <-> M went through A, which copied both directions' bytes: a quarter of the data each way, at least
    assert a.bytes_relayed >= 2 * 4 * 20_000 // 4
    assert len(n._conns["M"]) == len(m._conns["N"]) == 2


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the other side closed (EOF or reset) within 3 s without sending a byte."""
    try:
        return await asyncio.wait_for(reader.read(), 3.0) == b""
    except ConnectionResetError:
        return True


async def test_a_relay_refuses_bad_splice_requests_and_drops_unpaired_ones_in_time(
        make_endpoints: MakeEndpoints) -> None:
    (a,) = await make_endpoints("A", connect_timeout_s=0.5)
    host, _, port = a.address.rpartition(":")
    for preamble in (relay.MAGIC + (60_000).to_bytes(2, "big"), relay.MAGIC + b"\x00\x00",  # oversized, empty key
                     relay.MAGIC + b"\x00\x10abc"):  # cut short
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(preamble)
        if preamble.endswith(b"abc"):
            writer.write_eof()
        assert await closed(reader), "the relay answered a bad splice request"
        writer.close()
    reader, writer = await asyncio.open_connection(host, int(port))  # a well-formed request nobody pairs
    writer.write(relay.MAGIC + (3).to_bytes(2, "big") + b"key" + b"early bytes")
    assert await closed(reader)
    writer.close()
    assert a.relay.waiting == 0 and a.bytes_relayed == 0


async def test_peers_that_nobody_can_dial_meet_through_a_stand_alone_relay(make_endpoints: MakeEndpoints) -> None:
    n, m = await make_endpoints("NM")
    for ep in (n, m):
        await behind_nat(ep)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = relay.Relay(pair_timeout_s=2.0)
    serving = asyncio.get_running_loop().create_task(relay.serve_forever(server, listener))
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        group = as_others_see([n, m])
        assert relay_for(group) == "" and relay_for(group, address) == address
        await asyncio.gather(n.reach_out([("M", "")], address), m.reach_out([("N", "")], address))
        xs = inputs(2, 10_000)
        assert_exact_mean(await run_all([n, m], xs, group), xs)
        assert server.bytes_relayed > 2 * 4 * 10_000 // 2
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        listener.close()


def test_swarm_relay_serves_until_sigterm_and_closes_what_is_not_a_splice() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "swarm.cli.main", "relay", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("relay listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            try:
                assert sock.recv(100) == b"", "the relay answered something that is not a splice request"
            except ConnectionResetError:
                pass  # closed with our bytes unread: a reset
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "relay stopped" in err.decode()
    finally:
        proc.kill()
        proc.wait()
