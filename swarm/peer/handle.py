"""A blocking handle on a peer for synchronous training code.

The peer's network side (`Peer`: heartbeats, the data plane, rounds) runs on
one asyncio loop in one worker thread; the training loop stays synchronous in
the caller's thread and calls `start`, `sync` and `close`, each of which
waits for the loop with a deadline-free but interruptible wait: Ctrl-C or
SIGTERM in the training thread stops the peer (the round in flight is
abandoned, nothing half-applied) and leaves the run before the exception
goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from swarm.compression import Contribution
from swarm.coordinator.client import ClientConfig
from swarm.peer.peer import Peer, PeerConfig
from swarm.peer.state import PeerReport, RoundState, SyncResult
from swarm.proto.v1 import coordinator_pb2 as pb

T = TypeVar("T")
_POLL_S = 0.2
"""How often a waiting training thread wakes to let Python run its signal handlers."""


class SwarmPeer:
    """A peer of a swarm run for use with `swarm.DiLoCo(..., peer=SwarmPeer(...))`.

    `SwarmPeer(coordinator="host:7070", run_id="run1")` is enough for most loops; pass a full
    `PeerConfig` (`swarm.peer.PeerConfig`: data plane, deadlines, metrics) for the rest.

    Args:
        config: the peer's settings; or None, to build them from the keywords below.
        coordinator: the coordinator's host:port (without `config`).
        run_id: the run to join (without `config`).
        peer_id: this peer's id, unique in the run (without `config`; default HOSTNAME-PID).

    Raises:
        ValueError: neither `config` nor `coordinator` is given, or both are, or an address is malformed.
    """

    def __init__(self, config: PeerConfig | None = None, *, coordinator: str | None = None, run_id: str = "default",
                 peer_id: str | None = None) -> None:
        if (config is None) == (coordinator is None):
            raise ValueError("SwarmPeer needs either config=PeerConfig(...) or coordinator='host:port', not both")
        if config is None:
            assert coordinator is not None
            client = ClientConfig(target=coordinator, run_id=run_id,
                                  peer_id=peer_id or f"{socket.gethostname()}-{os.getpid()}")
            config = PeerConfig(client=client)
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-peer", daemon=True)
        self._thread.start()
        self.peer: Peer = self._call(self._make_peer())
        self.report: PeerReport | None = None
        self.started = False

    async def _make_peer(self) -> Peer:
        return Peer(self.config)  # built on the loop: its asyncio objects belong there

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            while True:
                try:
                    return fut.result(timeout=_POLL_S)
                except concurrent.futures.TimeoutError:
                    continue
        except BaseException:
            # Ctrl-C/SIGTERM (or an error) in the training thread: stop the work on the loop too.
            fut.cancel()
            raise

    @property
    def round(self) -> int:
        """The round this peer rendezvouses for next."""
        return self.peer.round

    def start(self, state: RoundState | None = None) -> None:
        """Serve the data plane, join, and resync `state` when the run already committed rounds.

        Without `state`: join only (`self.peer.stage` says which stage), then `attach` a state.

        Raises:
            CoordinatorCallError: the join was refused or the coordinator is unreachable.
        """
        self._call(self.peer.start(state))
        self.started = True

    def attach(self, state: RoundState) -> None:
        """Give a started peer its state (resynced when the run already committed rounds)."""
        self._call(self.peer.attach(state))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the peer's loop and wait for it (interruptible, like every call here)."""
        return self._call(coro)

    def sync(self, contribution: Contribution) -> SyncResult:
        """One round with this peer's `contribution` (see `Peer.sync`)."""
        return self._call(self.peer.sync(contribution))

    def set_progress(self, step: int, loss: float, tokens_per_s: float, grad_norms: list[float] | None = None) -> None:
        """What the next heartbeats report (shown by `swarm status` and `swarm local`).

        Args:
            grad_norms: a pipeline stage's last gradient norm before clipping (CheckFree weighs by it).
        """
        progress = pb.Progress(step=step, loss=loss, tokens_per_s=tokens_per_s, stage_grad_norms=grad_norms or [])
        self._loop.call_soon_threadsafe(setattr, self.peer, "progress", progress)

    def set_checkpoint(self, round_: int) -> None:
        """Tell the coordinator (with the next heartbeats) that this peer holds a checkpoint of `round_` (from any
        thread; a no-op once the peer is closed)."""
        if not self._loop.is_closed() and self.report is None:
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self._loop.call_soon_threadsafe(setattr, self.peer, "checkpoint_round", round_)

    def close(self, reason: str = "done") -> None:
        """Leave the run, stop the loop and its thread; idempotent."""
        if self.report is not None:
            return
        try:
            self.report = self._call(self.peer.close(reason))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
