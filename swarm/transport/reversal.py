"""Connection reversal: a peer that accepts no inbound connection (behind NAT) dials the others, and both
sides send over what it dialed.

A peer the coordinator could not reach (`Endpoint.dials_out`) says "duplex" in the hello of every
connection it opens. The peer it dials keeps that connection as its own way to send to it (`adopt`),
as if it had dialed it, and the dialer reads frames coming back on it (`serve_dialed`). Others are
given an empty address for such a peer: a send to it waits, up to `connect_timeout_s`, for one of
its connections to arrive (`wait_for_dial_in`) instead of dialing. At each attempt the dialer makes
sure its connections to every member it can dial exist and are fresh (`reach_out`).

Two peers that both accept no inbound connection meet through a relay (relay.py): a member others
can dial, chosen the same way by both. Without one, the wait fails that peer with a reason that
says so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from swarm.transport import relay
from swarm.transport.frames import FrameError
from swarm.transport.inbox import PeerFailure
from swarm.transport.links import Link

if TYPE_CHECKING:
    from swarm.transport.endpoint import Endpoint

log = logging.getLogger("swarm.transport")

DUPLEX = "duplex"
"""The hello tag of a connection its acceptor may send on too."""


def adopt(ep: Endpoint, peer: str, link: Link) -> None:
    """Keep `link`, dialed by `peer`, as a connection this endpoint sends to `peer` on."""
    ep._conns.setdefault(peer, []).append((link, asyncio.Lock()))
    ep._last_sent[link] = asyncio.get_running_loop().time()
    ep._dialed_in.set()


def forget(ep: Endpoint, peer: str, link: Link) -> None:
    """`link` to or from `peer` closed: stop sending on it."""
    conns = ep._conns.get(peer, [])
    conns[:] = [c for c in conns if c[0] is not link]
    ep._last_sent.pop(link, None)


async def wait_for_dial_in(ep: Endpoint, peer: str, index: int) -> tuple[Link, asyncio.Lock]:
    """The `index`-th connection `peer` dialed to us, once it exists.

    Raises:
        PeerFailure: none came within `connect_timeout_s`.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + ep.config.connect_timeout_s
    while len(conns := ep._conns.get(peer, [])) <= index:
        left = give_up - loop.time()
        if left <= 0:
            why = (f"accepts no inbound connection and did not dial {ep.peer_id} within "
                   f"{ep.config.connect_timeout_s:g} s")
            if ep.dials_out:
                why += " (neither peer accepts inbound connections: they need a relay)"
            raise PeerFailure(peer, why)
        ep._dialed_in.clear()
        try:
            async with asyncio.timeout(left):
                await ep._dialed_in.wait()
        except TimeoutError:
            continue
    return conns[index]


async def serve_dialed(ep: Endpoint, peer: str, link: Link) -> None:
    """Read the frames `peer` sends back on a connection this endpoint dialed, until it closes."""
    failed = "connection closed"
    try:
        h = await ep.read_header(link)  # no idle limit: the acceptor's reader closes an idle one
        while h is not None:
            if h.sender != peer:
                raise FrameError(f"frame claims sender {h.sender!r} on {peer!r}'s connection")
            await ep._read_payload(link, h)
            h = await ep.read_header(link)
    except asyncio.CancelledError:
        failed = ""
        raise
    except (FrameError, ConnectionError, OSError, TimeoutError) as e:
        failed = "stalled mid-frame" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        log.warning("data plane: dropping connection to %s: %s", peer, failed)
    finally:
        forget(ep, peer, link)
        link.close()
        if failed:
            ep._fail_everywhere(peer, failed)


async def reach_out(ep: Endpoint, peers: list[tuple[str, str]], relay_address: str = "") -> None:
    """Make sure this endpoint has its `connections_per_peer` connections, fresh, to each (peer, address), and
    through `relay_address` to each peer without an address (it cannot be dialed either); a peer that cannot be
    reached now is left for the all-reduce to fail and report."""
    loop = asyncio.get_running_loop()

    async def one(peer: str, address: str) -> None:
        stale = [link for link, _ in ep._conns.get(peer, [])
                 if loop.time() - ep._last_sent.get(link, loop.time()) > ep.config.idle_timeout_s / 2]
        for link in stale:  # the other side may close it any moment: replace it before it is needed
            forget(ep, peer, link)
            link.close()
        try:
            for lane in range(len(ep._conns.get(peer, [])), ep.config.connections_per_peer):
                if address:
                    await ep._connection(peer, address, lane)
                else:
                    await _through_relay(ep, peer, relay_address, lane)
        except PeerFailure as e:
            log.info("data plane: cannot reach %s ahead of the attempt: %s", peer, e.reason)

    await asyncio.gather(*(one(peer, address) for peer, address in peers if address or relay_address))


async def _through_relay(ep: Endpoint, peer: str, relay_address: str, lane: int) -> None:
    """Open lane `lane` to `peer` through the relay: the lower id of the two dials over it (TLS client, duplex
    hello), the other serves it as if it had accepted it; both then send on it."""
    try:
        sock = await relay.open_splice(relay_address, relay.splice_key(ep.run_id, ep.peer_id, peer, lane),
                                      ep.config.connect_timeout_s)
    except (OSError, TimeoutError) as e:
        raise PeerFailure(peer, f"cannot reach the relay {relay_address}: {e or 'timed out'}") from None
    if ep.peer_id < peer:
        ep.add_lane(peer, await ep.greet(sock, peer, True, f"cannot reach it through the relay {relay_address}"))
    else:
        ep.serve(sock, f"the relay {relay_address}")
