"""A data-plane connection's byte stream: plain TCP, or TLS over it, behind one small interface.

`Link.send` and `Link.recv_into` are all the endpoint uses, so payloads move the same way on both:
from a memoryview of the payload out, and into the destination buffer in. TLS runs on a non-blocking
`ssl.SSLSocket` that the event loop only watches for readiness (the loop's own TLS needs streams,
and memory BIOs cost two more copies of every payload). Both sides present certificates of the run's CA (mutual TLS): a
link's `peer_name` is the common name of the other side's certificate, which the endpoint compares
with the peer id the other side claims.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass

from swarm.security.files import CA_NAME, cert_path, key_path

log = logging.getLogger(__name__)

_WRITE_BYTES = 1 << 20
"""Plaintext handed to OpenSSL per write (it cuts it into records of 16 KiB)."""
_THREAD_BYTES = 256 << 10
"""Reads and writes at least this large run on a worker thread; smaller ones (headers) on the loop."""
_WANT_READ, _WANT_WRITE = -1, -2
_CRYPTO = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="tls")
"""Where large TLS reads and writes run."""


CONGESTION = "cubic"
"""Default TCP congestion control of data-plane connections, whatever the host's (see `tune`)."""
_refused_congestion: set[str] = set()


def tune(sock: socket.socket, congestion: str = CONGESTION) -> None:
    """Set up a data-plane TCP socket: non-blocking, no Nagle delay, `congestion` as its congestion control
    ("" keeps the system's default; TransportConfig.congestion_control).

    CUBIC by default: in the time-scaled WAN lab (4 peers, 1 Gbit/s, 50 ms one-way, 8 connections a pair,
    runs interleaved) the all-reduce used 0.82-0.85 of the link with it and 0.65-0.67 with BBR, this VM's
    default (docs/benchmarks.md, A6). A kernel without `congestion` (or one that does not allow it to this
    user) keeps its default, said once in the log.
    """
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if congestion and hasattr(socket, "TCP_CONGESTION"):  # Linux
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError as e:
            if congestion not in _refused_congestion:
                _refused_congestion.add(congestion)
                log.warning("data plane: TCP congestion control %r is not available (%s); using the system's "
                            "default", congestion, e.strerror or e)


@dataclass(kw_only=True, slots=True)
class TlsFiles:
    """Where a peer's TLS identity lives: the run CA's certificate, its own certificate and key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def in_folder(cls, folder: str, name: str) -> TlsFiles:
        """`name`'s files in a `swarm keys` folder: ca.crt, NAME.crt, NAME.key."""
        return cls(ca=str(cert_path(folder, CA_NAME)), cert=str(cert_path(folder, name)), key=str(key_path(folder, name)))

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server, client) contexts: TLS 1.3, certificates required both ways, verified against the CA.

        Raises:
            OSError, ssl.SSLError: a file is missing or not a certificate/key of the right kind.
        """
        made = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
            # Names are checked by the endpoint against peer ids (a peer's address says nothing of it).
            ctx.check_hostname = False
            made.append(ctx)
        return made[0], made[1]


class Link:
    """A plain TCP connection."""

    peer_name: str | None = None
    """The other side's certificate name (None: plain TCP, no certificate)."""
    peer_cert: bytes | None = None
    """The other side's certificate, DER (None: plain TCP)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def send(self, data: bytes | memoryview) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_into(self, view: memoryview) -> int:
        """Bytes read into `view` (0: the other side closed the connection)."""
        return await asyncio.get_running_loop().sock_recv_into(self.sock, view)

    def close(self) -> None:
        self.sock.close()


class TlsLink(Link):
    """TLS over a connected non-blocking socket; `await handshake()` before anything else.

    OpenSSL reads and writes the socket itself (an `ssl.SSLSocket` in non-blocking mode) and the event loop
    only says when the socket is ready: a payload is encrypted from its memoryview straight into the kernel
    and decrypted straight into the destination buffer, with no copy through memory BIOs.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        sock.setblocking(False)
        tls = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
        super().__init__(tls)  # the plain socket is detached: the TLS socket owns the descriptor now
        self._tls = tls
        self._lock = threading.Lock()  # an SSL object is used by one thread at a time

    async def handshake(self) -> None:
        """Run the TLS handshake; `peer_name` is then the other side's certificate name.

        Raises:
            ssl.SSLError: the other side's certificate is not from the run's CA, expired, or missing.
            ConnectionError: the connection closed during the handshake.
        """
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._ready(write=False)
            except ssl.SSLWantWriteError:
                await self._ready(write=True)
            except ssl.SSLEOFError:
                raise ConnectionError("connection closed during the TLS handshake") from None
        cert = self._tls.getpeercert() or {}
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        self.peer_name = names[0] if names else ""
        self.peer_cert = self._tls.getpeercert(binary_form=True) or b""

    async def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        loop = asyncio.get_running_loop()
        while view:
            chunk = view[:_WRITE_BYTES]
            # Encryption runs on a worker thread for large chunks (OpenSSL releases the GIL), so the links of
            # one peer encrypt in parallel and the event loop goes on; after a want, OpenSSL needs the same bytes.
            n = await loop.run_in_executor(_CRYPTO, self._write, chunk) if len(chunk) >= _THREAD_BYTES \
                else self._write(chunk)
            if n < 0:
                await self._ready(write=n == _WANT_WRITE)
            view = view[max(n, 0):]

    async def recv_into(self, view: memoryview) -> int:
        loop = asyncio.get_running_loop()
        while True:
            n = await loop.run_in_executor(_CRYPTO, self._read, view) if len(view) >= _THREAD_BYTES \
                else self._read(view)
            if n >= 0:
                return n
            await self._ready(write=n == _WANT_WRITE)

    def _write(self, chunk: memoryview) -> int:
        """Bytes of `chunk` written, or _WANT_READ / _WANT_WRITE: what the socket must be ready for first."""
        with self._lock:
            try:
                return self._tls.send(chunk)
            except ssl.SSLWantWriteError:
                return _WANT_WRITE
            except ssl.SSLWantReadError:  # TLS 1.3 may have to read (key updates) before it can write
                return _WANT_READ

    def _read(self, view: memoryview) -> int:
        """Bytes decrypted into `view`: as many records as have arrived (0: closed), or _WANT_READ/_WANT_WRITE
        when none had."""
        got = 0
        with self._lock:
            while got < len(view):
                try:
                    n = self._tls.recv_into(view[got:])
                except ssl.SSLWantReadError:
                    return got or _WANT_READ
                except ssl.SSLWantWriteError:
                    return got or _WANT_WRITE
                except ssl.SSLZeroReturnError:
                    return got
                if n == 0:
                    return got
                got += n
        return got

    async def _ready(self, write: bool) -> None:
        fd = self._tls.fileno()
        if fd < 0:
            raise ConnectionError("connection closed")
        await wait_ready(fd, write)


async def wait_ready(fd: int, write: bool = False) -> None:
    """Wait until descriptor `fd` can be written (or read); the caller's timeout cancels the wait cleanly."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
