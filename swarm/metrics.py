"""Prometheus metrics over HTTP: `GET /metrics` in the text exposition format (version 0.0.4).

A metrics server serves whatever its `collect` callable returns at scrape time,
so the numbers are read from the owner's state and never kept twice. It runs
on the owner's asyncio loop (STYLE 9); a scrape that stalls is cut off after
a deadline and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("swarm.metrics")
_READ_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Metric:
    """One sample: a counter (only goes up) or a gauge, with its help text."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def render(metrics: list[Metric]) -> str:
    """The text exposition of `metrics` (samples of one name grouped under one HELP/TYPE)."""
    lines: list[str] = []
    seen: set[str] = set()
    for m in metrics:
        if m.name not in seen:
            seen.add(m.name)
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in m.labels)
        value = "NaN" if math.isnan(m.value) else ("+Inf" if m.value == math.inf else repr(float(m.value)))
        lines.append(f"{m.name}{{{labels}}} {value}" if labels else f"{m.name} {value}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """Serves `collect()` at `http://HOST:PORT/metrics`.

    Args:
        collect: called at each scrape; returns the samples.
        host, port: where to listen (port 0 picks a free one).
    """

    def __init__(self, collect: Callable[[], list[Metric]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.collect = collect
        self.host, self.port = host, port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        """Start listening; returns host:port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0]
            if method != b"GET":
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif path.split(b"?")[0] not in (b"/metrics", b"/"):
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", render(self.collect()), "text/plain; version=0.0.4"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
            log.debug("metrics: dropped a scrape: %s", e)
        finally:
            writer.close()
