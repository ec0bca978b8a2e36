"""A data-plane connection's byte stream: plain TCP, or TLS over it, behind one small interface.

`Link.send` and `Link.recv_into` are all the endpoint uses, so payloads move the same way on both:
from a memoryview of the payload out, and into the destination buffer in. TLS runs through
`ssl.MemoryBIO`s on the event loop's socket calls (the loop's own TLS needs streams, which would
copy every payload once more). Both sides present certificates of the run's CA (mutual TLS): a
link's `peer_name` is the common name of the other side's certificate, which the endpoint compares
with the peer id the other side claims.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

from swarm.security.files import CA_NAME, cert_path, key_path

_RECV_BYTES = 256 << 10
"""Bytes read from the socket at a time when TLS needs more."""
_RECORD_BYTES = 16 << 10
"""Plaintext written per TLS record (TLS's own maximum)."""


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
    """TLS over a connected socket; `await handshake()` before anything else."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        super().__init__(sock)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side)

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
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("connection closed during the TLS handshake") from None
        await self._flush()
        cert = self._tls.getpeercert() or {}
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        self.peer_name = names[0] if names else ""

    async def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._tls.write(view[:_RECORD_BYTES])
            view = view[n:]
            if self._out.pending >= _RECV_BYTES or not view:
                await self._flush()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self._tls.read(len(view), view)
            except ssl.SSLWantReadError:
                await self._flush()  # TLS 1.3 may have to answer (key updates) before it can read
                if not await self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    async def _flush(self) -> None:
        if self._out.pending:
            await asyncio.get_running_loop().sock_sendall(self.sock, self._out.read())

    async def _fill(self) -> bool:
        """Feed the TLS object what the socket has; False once the socket is closed."""
        chunk = await asyncio.get_running_loop().sock_recv(self.sock, _RECV_BYTES)
        if not chunk:
            self._in.write_eof()
            return False
        self._in.write(chunk)
        return True
