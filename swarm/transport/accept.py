"""The accepting side of the data plane: one task per incoming connection.

A connection is a splice request for this peer to relay (relay.py), or TLS (when the run has it) and a
hello naming its sender, then one of: the sender's all-reduce frames (a duplex hello: this peer may
send back on it, reversal.py), a state download, or calls (messages.py). Whatever breaks it is logged
with the sender's name and address and fails that sender's attempts; nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from swarm.transport import messages, relay, reversal
from swarm.transport.frames import FrameError, Idle
from swarm.transport.links import Link, TlsLink, tune

if TYPE_CHECKING:
    from swarm.transport.endpoint import Endpoint

log = logging.getLogger("swarm.transport")


async def accept_loop(ep: Endpoint) -> None:
    """Accept connections and serve each in its own task until cancelled."""
    loop = asyncio.get_running_loop()
    assert ep._listener is not None
    while True:
        try:
            conn, remote = await loop.sock_accept(ep._listener)
        except OSError as e:  # out of file descriptors (EMFILE), say: keep serving once some are free
            log.error("data plane: cannot accept a connection (%s); trying again in 0.5 s", e)
            await asyncio.sleep(0.5)
            continue
        host = str(remote[0])
        if ep._per_address.get(host, 0) >= ep.config.max_connections_per_address:
            conn.close()
            if len(ep._refused_logged) > 1024:
                ep._refused_logged.clear()
            if loop.time() - ep._refused_logged.get(host, -1e9) > 10.0:  # a line per flood, not per socket
                ep._refused_logged[host] = loop.time()
                log.warning("data plane: refusing connections from %s: it holds %d already "
                            "(max_connections_per_address)", host, ep._per_address[host])
            continue
        ep._per_address[host] = ep._per_address.get(host, 0) + 1
        tune(conn, ep.config.congestion_control)
        ep.spawn(serve_connection(ep, conn, host, f"{host}:{remote[1]}"))


async def serve_connection(ep: Endpoint, sock: socket.socket, host: str, where: str) -> None:
    """Serve one connection accepted from `host` ("": one this peer opened to a relay for a peer that dials it)."""
    sender = ""  # the member whose attempts a broken connection fails ("": none)
    named = ""  # who the connection says it is, for the log
    conn = Link(sock)
    try:
        async with asyncio.timeout(ep.config.io_timeout_s):
            first_bytes = await relay.first_bytes(sock, len(relay.MAGIC))
            key = await relay.read_key(sock) if first_bytes == relay.MAGIC else None
        if not first_bytes:
            log.debug("data plane: %s closed without a byte (a reachability probe?)", where)
            return
        if key is not None:
            await ep.relay.serve(sock, key, where)
            return
        async with asyncio.timeout(ep.config.io_timeout_s):  # say hello promptly or be dropped
            if ep._tls is not None:
                conn = TlsLink(sock, ep._tls[0], server_side=True)
                await conn.handshake()
                named = conn.peer_name or ""
                if ep.revoked(conn):
                    raise FrameError(f"its certificate ({named!r}) is revoked (the run's crl.pem)")
            hello = await ep.read_header(conn)
        if hello is None:
            return
        if hello.kind != "hello" or not hello.sender or hello.nbytes:
            raise FrameError("a connection must start with a hello frame without payload")
        if hello.run != ep.run_id:
            raise FrameError(f"peer {hello.sender} belongs to run {hello.run!r}, not {ep.run_id!r}")
        if conn.peer_name is not None and conn.peer_name != hello.sender:
            raise FrameError(f"the certificate of {conn.peer_name!r} claims to be {hello.sender!r}")
        sender = named = hello.sender
        duplex = hello.tag == reversal.DUPLEX
        if duplex:
            reversal.adopt(ep, sender, conn)
        first = await ep.read_header(conn, ep.config.idle_timeout_s)
        if duplex and first is not None and first.kind in ("state_req", "call"):
            raise FrameError(f"a {first.kind} on a duplex data connection")
        if first is not None and first.kind == "state_req":
            sender = ""  # a state download is not a member of any attempt: its end fails nothing
            await messages.serve_state(ep, conn, hello.sender)
            return
        if first is not None and first.kind == "call":
            sender = ""  # nor are calls
            await messages.serve_calls(ep, conn, hello.sender, first)
            return
        h = first
        while h is not None:
            if h.sender != sender:
                raise FrameError(f"frame claims sender {h.sender!r} on {sender!r}'s connection")
            if ep.revoked(conn):  # (revoked since the handshake: the connection goes now)
                raise FrameError(f"its certificate ({sender!r}) was revoked (the run's crl.pem)")
            await ep._read_payload(conn, h)
            h = await ep.read_header(conn, ep.config.idle_timeout_s)
    except Idle:
        log.debug("data plane: closing %s's connection, idle for %.0f s", sender, ep.config.idle_timeout_s)
        sender = ""  # idle between frames: it owes nothing, so nothing fails
    except (FrameError, ConnectionError, OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
        why = "stalled mid-frame" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        log.warning("data plane: dropping connection from %s at %s: %s", named or "an unnamed peer", where, why)
        if sender:
            ep._fail_everywhere(sender, why)
    finally:
        if named:
            reversal.forget(ep, named, conn)
        conn.close()
        if (left := ep._per_address.pop(host, 1) - 1) > 0:
            ep._per_address[host] = left
        if sender:
            ep._fail_everywhere(sender, "connection closed")
