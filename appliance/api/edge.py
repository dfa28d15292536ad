"""Who is asking: the tunnel rule, the local-only paths, per-client rate and stream limits (plain ASGI).

cloudflared runs on the Pi and connects from 127.0.0.1, so the peer address alone cannot tell the
internet from the Pi itself. What does is the headers cloudflared adds (``Cf-Connecting-Ip``, ``Cf-Ray``,
...): a request carrying any ``Cf-*`` header (or another proxy's, :mod:`appliance.helpers.local_only`)
came through the tunnel. So:

* *local*: a peer in ``CRYPTOPI_HTTP_LOCAL_NETWORKS`` and no proxy header. Served everything, never
  rate-limited (the bench, the container health check, Prometheus on the Pi).
* anyone else is limited per client: the tunnel's ``Cf-Connecting-Ip`` when the peer is loopback (the
  local cloudflared; from any other peer the header is a client's claim and ignored), else the peer.
  ``/metrics``, ``/docs``, ``/redoc`` and ``/openapi.json`` answer them 403, and each may hold only
  so many streams open (behind the tunnel every connection comes from cloudflared, so the server's
  connection cap alone would let one visitor's streams lock everyone else out).

A token bucket per client, in one dict on the one event loop: no lock, no timer thread (which is
what the ``limits`` package's memory storage brings), and one dict look-up per request instead of a
Starlette ``Request`` and a decorator per route (slowapi).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.helpers.local_only import proxy_header
from appliance.logs import ThrottledLog
from appliance.metrics import HTTP_REFUSED

log = logging.getLogger(__name__)

#: Paths served to local clients only: telemetry and the documentation, not the public surface.
LOCAL_ONLY = ("/metrics", "/docs", "/redoc", "/openapi.json")
#: Clients remembered at most; the least recently seen is forgotten first (it starts with a full bucket).
MAX_CLIENTS = 10_000


class TokenBuckets:
    """``rate`` requests a second per key, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when), least recent first

    def take(self, key: str) -> float:
        """0 if ``key`` may go ahead (and it is charged), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            del self._buckets[next(iter(self._buckets))]
        return wait


class Edge:
    """The ASGI middleware in front of every route (HTTP and WebSocket)."""

    def __init__(self, app: ASGIApp, *, local_networks: Sequence[str], rate_per_s: float, burst: int,
                 streams_per_client: int) -> None:  # fmt: skip
        self.app = app
        self.buckets = TokenBuckets(rate_per_s, burst)
        self.streams_per_client = streams_per_client
        self.streams: dict[str, int] = {}  # open WebSockets per public client
        networks = tuple(ipaddress.ip_network(n) for n in local_networks)
        self.refusals = ThrottledLog(log)

        @lru_cache(maxsize=4096)
        def is_local(host: str) -> bool:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(address in network for network in networks)

        self.is_local = is_local

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        peer = scope["client"][0] if scope.get("client") else ""
        forwarded_for = None
        tunnel = False
        for name, value in scope["headers"]:
            if proxy_header(name):  # the one rule the webhook follows too
                tunnel = True
                if name == b"cf-connecting-ip":
                    forwarded_for = value.decode("latin-1")
        if not tunnel and self.is_local(peer):
            await self.app(scope, receive, send)
            return
        client = forwarded_for if forwarded_for and is_loopback(peer) else peer
        path: str = scope["path"]
        if path.startswith(LOCAL_ONLY):
            await self.refuse(scope, send, 403, "local_only", client,
                              f"{path} is served to clients on the appliance's own network only")  # fmt: skip
            return
        wait = self.buckets.take(client)
        if wait:
            retry = math.ceil(wait)
            await self.refuse(scope, send, 429, "rate_limited", client,
                              f"too many requests from {client}: at most {self.buckets.rate:g} a second "
                              f"(bursts of {self.buckets.burst:g}); retry in {retry} s",
                              [(b"retry-after", str(retry).encode())])  # fmt: skip
            return
        if scope["type"] == "http":
            await self.app(scope, receive, send)
            return
        if self.streams.get(client, 0) >= self.streams_per_client:
            await self.refuse(scope, send, 403, "too_many_streams", client,
                              f"at most {self.streams_per_client} streams per client")  # fmt: skip
            return
        self.streams[client] = self.streams.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            if (left := self.streams.pop(client) - 1) > 0:
                self.streams[client] = left

    async def refuse(self, scope: Scope, send: Send, status: int, reason: str, client: str, detail: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        HTTP_REFUSED.labels(reason).inc()
        self.refusals.warning(
            reason, "http request refused", reason=reason, client=client, path=scope["path"]
        )
        if scope["type"] == "websocket":  # closed before the handshake: the client sees an HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        await send_error(send, status, detail, headers)


def error_body(detail: str) -> bytes:
    """The one error shape of the whole API."""
    return json.dumps({"detail": detail}).encode()


async def send_error(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = error_body(detail)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


@lru_cache(maxsize=4096)
def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
