"""How a peer's data plane listens and talks (`swarm peer`'s data-plane flags end up here)."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.transport.links import CONGESTION, TlsFiles


@dataclass(kw_only=True, slots=True)
class TransportConfig:
    """How a peer's data plane listens and talks."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one."""
    advertise_host: str = ""
    """Host others should dial (default: host; an unspecified host, 0.0.0.0, lets the coordinator fill in the
    address it sees this peer's calls come from)."""
    advertise_port: int = 0
    """Port others should dial, when it differs from the one listened on (a NAT port forward); 0: the same."""
    inbound: bool = True
    """Others can dial this peer. False (behind NAT): it is never dialed; it dials the others and both send on
    those connections (transport/reversal.py)."""
    connections_per_peer: int = 1
    """Parallel TCP connections per peer pair (several fill a long fat pipe)."""
    congestion_control: str = CONGESTION
    """TCP congestion control of this peer's data-plane connections ("": the system's); why CUBIC: `links.tune`."""
    chunk_bytes: int = 4 << 20
    """Payload bytes per frame; parts are cut into chunks of this size."""
    max_frame_bytes: int = 256 << 20
    """Largest payload accepted in one frame."""
    max_pending_bytes: int = 4 << 30
    """Memory allowed for data of attempts this peer has not started yet."""
    max_pending_bytes_per_peer: int = 1 << 30
    """The part of it one sender may hold: one peer claiming far-off attempts cannot take all of it."""
    idle_timeout_s: float = 600.0
    """An incoming connection with no frame for this long is closed (senders redial theirs after half)."""
    max_connections_per_address: int = 256
    """Incoming connections one remote address may hold at once; more are closed at accept (peers behind one
    NAT share an address: each uses connections_per_peer, plus downloads and calls)."""
    connect_timeout_s: float = 5.0
    """Give up connecting to a peer after this long."""
    io_timeout_s: float = 30.0
    """A frame (send or receive) that makes no progress for this long fails its peer."""
    max_state_bytes: int = 64 << 30
    """Largest state accepted from a donor."""
    max_call_bytes: int = 1 << 30
    """Largest call or reply accepted (a microbatch's activations)."""
    tls: TlsFiles | None = None
    """Mutual TLS with the run's certificates (None: plain TCP, for loopback and trusted networks)."""

    def __post_init__(self) -> None:
        if self.max_connections_per_address < 1:
            raise ValueError("max_connections_per_address must be >= 1")
        if self.connections_per_peer < 1 or self.chunk_bytes < 1024:
            raise ValueError("connections_per_peer must be >= 1 and chunk_bytes >= 1024")
        if self.chunk_bytes > self.max_frame_bytes:
            raise ValueError("chunk_bytes must not exceed max_frame_bytes")
        if not self.idle_timeout_s > 2 * self.io_timeout_s:
            raise ValueError("idle_timeout_s must be more than twice io_timeout_s")
