"""Serve the coordinator over gRPC (grpc.aio), with the standard health service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.core import Coordinator
from swarm.coordinator.service import CoordinatorService
from swarm.coordinator.store import Store
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("swarm.coordinator")
SERVICE_NAME = "swarm.v1.Coordinator"
# Status replies list every member; they may be much larger than requests.
MAX_SEND_BYTES = 256 << 20


@dataclass(slots=True)
class RunningServer:
    """A started coordinator server; `stop()` ends it and flushes the store."""

    server: grpc.aio.Server
    core: Coordinator
    port: int
    _ticker: asyncio.Task[None]

    async def stop(self, grace_s: float = 1.0) -> None:
        self._ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        await self.server.stop(grace_s)
        self.core.store.close()


async def start(config: CoordinatorConfig, store: Store, host: str, port: int,
                clock: Callable[[], float] | None = None) -> RunningServer:
    """Start serving on host:port (port 0 picks a free port).

    Raises:
        OSError: the address cannot be bound.
    """
    core = Coordinator(config, store) if clock is None else Coordinator(config, store, clock)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}; is the port in use?")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ticker = asyncio.get_running_loop().create_task(_tick_forever(core))
    return RunningServer(server=server, core=core, port=bound, _ticker=ticker)


async def _tick_forever(core: Coordinator) -> None:
    while True:
        try:
            await core.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a tick must not stop leases from expiring forever
            log.exception("coordinator tick failed; continuing")
            await asyncio.sleep(core.config.tick_interval_s)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
