"""The HTTP server: uvicorn (httptools, uvloop) on the appliance's event loop, with bounded resources.

uvicorn's knobs cover WebSocket message size (``ws_max_size``), idle keep-alive and graceful
shutdown. What it leaves open, :class:`EdgeProtocol` (its httptools protocol, four hooks) closes:

* pipelining: uvicorn resumes reading after every answer even while requests are still queued, so a
  client that pipelines and never reads makes it parse (and hold) everything it sends. Here reading
  resumes only once the queue is empty: requests are read only as fast as answers are written;
* header size and count: httptools has no limit (it buffers a 20 MB header whole); here the request
  line and headers are counted as they are parsed, and the reads of a head still incomplete as they
  arrive, and the head is refused with 431 past the limit;
* a deadline for the request head, from connect or the previous answer (slowloris, idle sockets);
* a cap on open connections. At the cap, a new connection takes the place of the one that has waited
  longest for a request head (an idle keep-alive or a slow head: nothing in flight is lost), so a
  flood of idle sockets never locks out a real request; when every connection is busy (a request
  or a stream), the new one gets a 503 and is closed at once, before it costs a request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import ClassVar

import httptools
import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from appliance.api.edge import error_body
from appliance.logs import ThrottledLog
from appliance.metrics import HTTP_REFUSED
from appliance.settings import Settings

log = logging.getLogger(__name__)
#: File descriptors kept for everything but client connections (SQLite, models, MQTT, the feed, ...).
SPARE_FDS = 128


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout_s: float
    max_header_bytes: int
    max_headers: int


class HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing a request head that breaks a limit."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (``limits`` is set by :func:`http_server`)."""

    limits: ClassVar[Limits]
    #: Connections waiting for a request head, longest first: the ones given up at the cap.
    waiting: ClassVar[dict[EdgeProtocol, None]]
    refusals: ClassVar[ThrottledLog] = ThrottledLog(log)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # reads of a request head still incomplete (see data_received)
        self._progress = False  # a head or body part was parsed from the read being fed
        self._head_size = self._headers = 0  # of the head being parsed: parsed bytes, header fields
        self._refused: tuple[int, str, str] | None = None  # (status, reason, detail) of a head refused
        self._head_deadline: asyncio.TimerHandle | None = None
        self._running: RequestResponseCycle | None = None
        if len(self.connections) > self.limits.max_connections:
            if not self.waiting:
                cap = self.limits.max_connections
                detail = f"the appliance is serving its limit of {cap} connections; retry soon"
                self.refuse(503, "too_many_connections", detail)
                return
            HTTP_REFUSED.labels("idle_evicted").inc()
            next(iter(self.waiting)).give_up()
        self.arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_head_deadline()
        # uvicorn tells only the newest parsed request that the client left; the one answering and
        # those queued behind it would write to a closed transport.
        for cycle in (self._running, *(queued for queued, _ in self.pipeline)):
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refused:
                self.refuse(*self._refused)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        # A chunk that completed a head or carried body is not counted: what follows in it is at most
        # one read (256 KiB), so a head is refused within a read of its limit, and the count never
        # mistakes many small pipelined requests in one read for one big head.
        self._head_bytes = 0 if self._progress else self._head_bytes + len(data)
        if self._head_bytes > self.limits.max_header_bytes:
            self.refuse(*self.too_large())

    def too_large(self) -> tuple[int, str, str]:
        return 431, "headers_too_large", f"request line and headers over {self.limits.max_header_bytes} bytes"

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = self._headers = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            self._refused = self.too_large()
            raise HeadRefused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._head_size += len(name) + len(value) + 4
        if self._headers > self.limits.max_headers:
            self._refused = (431, "too_many_headers", f"more than {self.limits.max_headers} header fields")
            raise HeadRefused
        if self._head_size > self.limits.max_header_bytes:
            self._refused = self.too_large()
            raise HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._progress = True
        self.disarm_head_deadline()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_response_complete(self) -> None:
        if not self.pipeline:
            super().on_response_complete()  # resumes reading, arms the keep-alive timeout
            if not self.transport.is_closing():
                self.arm_head_deadline()
            return
        # The next queued request runs; reading stays paused until the queue is empty.
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)

    def arm_head_deadline(self) -> None:
        self.disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.limits.header_timeout_s, self.head_too_slow)
        self.waiting[self] = None

    def disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
            del self.waiting[self]

    def head_too_slow(self) -> None:
        HTTP_REFUSED.labels("header_timeout").inc()
        self.give_up()

    def give_up(self) -> None:
        """Close a connection that has no request in flight."""
        self.disarm_head_deadline()
        self.transport.close()

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer ``status`` with the API's error body, then close: nothing more is read."""
        HTTP_REFUSED.labels(reason).inc()
        self.refusals.warning(reason, "http connection refused", reason=reason,
                              client=self.client[0] if self.client else None)  # fmt: skip
        body = error_body(detail)
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))  # fmt: skip
        self.transport.close()


def http_server(app: ASGIApp, settings: Settings) -> uvicorn.Server:
    """The server ``runtime.up`` runs, with every limit from the settings."""
    limits = Limits(
        max_connections=fd_budget(settings.http_max_connections),
        header_timeout_s=settings.http_header_timeout_s,
        max_header_bytes=settings.http_max_header_bytes,
        max_headers=settings.http_max_headers,
    )
    protocol = type("EdgeProtocol", (EdgeProtocol,), {"limits": limits, "waiting": {}})
    return uvicorn.Server(uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_config=None, access_log=False,
        lifespan="off", proxy_headers=False,  # the client address is appliance.api.edge's business
        http=protocol, ws="websockets-sansio", ws_max_size=settings.ws_max_message_bytes,
        timeout_keep_alive=settings.http_keepalive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=5,
    ))  # fmt: skip


def fd_budget(wanted: int) -> int:
    """The connection cap the open-file limit allows: raised to its hard limit first, then reported."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return wanted
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    allowed = hard - SPARE_FDS
    if wanted > allowed:
        log.warning("connection cap lowered to what the open-file limit allows",
                    extra={"wanted": wanted, "cap": allowed, "nofile": hard})  # fmt: skip
        return max(allowed, 1)
    return wanted
