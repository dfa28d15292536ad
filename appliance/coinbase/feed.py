"""Coinbase Exchange WebSocket feed client: subscribe, watch, reconnect forever.

It yields only validated trade and heartbeat messages plus connection events; every other frame is
counted and logged here, so the ingester deals in facts. A feed that goes silent longer than the
watchdog is dropped and re-dialled with exponential back-off and full jitter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from appliance.coinbase.messages import (
    ErrorMessage,
    HeartbeatMessage,
    MatchMessage,
    Rejected,
    SubscriptionsMessage,
    parse_feed_frame,
)
from appliance.helpers.throttle import ThrottledLog
from appliance.metrics import FEED_CONNECTED, FEED_CONNECTS, FEED_DISCONNECTS, FEED_MESSAGES, FEED_REJECTED

log = logging.getLogger(__name__)

#: Close codes that mean the server sent something we refuse: counted as a rejected frame.
_REFUSAL_CODES = {1009: "frame_too_large", 1007: "protocol_error", 1002: "protocol_error"}


@dataclass(frozen=True, slots=True)
class Connected:
    url: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


FeedEvent = MatchMessage | HeartbeatMessage | Connected | Disconnected


def backoff_delay(failures: int, cap_s: float, base_s: float = 0.25) -> float:
    """Exponential back-off with full jitter; bounded however long the outage lasts."""
    return random.uniform(0, min(cap_s, base_s * 2 ** min(failures, 32)))


class Watchdog:
    """Closes a connection on which the client has waited for a frame longer than ``timeout_s``.

    It times only the waiting, not the consumer's work between frames: a long gap repair is never
    mistaken for a silent feed. One task per connection, so receiving a frame costs two assignments.
    """

    def __init__(self, ws: ClientConnection, timeout_s: float) -> None:
        self.waiting_since: float | None = None
        self.fired = False
        self._ws, self._timeout = ws, timeout_s
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._timeout / 4)
            since = self.waiting_since
            if since is not None and time.monotonic() - since > self._timeout:
                self.fired = True
                await self._ws.close(1001, "feed silent")
                return

    def stop(self) -> None:
        self._task.cancel()


class CoinbaseFeed:
    def __init__(
        self,
        url: str,
        products: Sequence[str],
        *,
        watchdog_s: float = 10.0,
        reconnect_max_s: float = 30.0,
        max_frame_bytes: int = 1 << 20,
    ) -> None:
        self.url = url
        self.products = tuple(products)
        self.watchdog_s = watchdog_s
        self.reconnect_max_s = reconnect_max_s
        self.max_frame_bytes = max_frame_bytes
        self.connected = False
        self.last_message_at: float | None = None  # time.time() of the newest valid message
        self._rejects = ThrottledLog(log)

    async def events(self) -> AsyncIterator[FeedEvent]:
        failures = 0
        while True:
            reason, cause = "closed", "closed"
            try:
                async with websockets.connect(
                    self.url,
                    max_size=self.max_frame_bytes,
                    open_timeout=10,
                    close_timeout=2,
                    ping_interval=20,
                    ping_timeout=20,
                ) as ws:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "subscribe",
                                "product_ids": list(self.products),
                                "channels": ["matches", "heartbeat"],
                            }
                        )
                    )
                    self.connected = True
                    FEED_CONNECTS.inc()
                    FEED_CONNECTED.set(1)
                    log.info("feed connected", extra={"url": self.url, "products": ",".join(self.products)})
                    yield Connected(self.url)
                    watchdog = Watchdog(ws, self.watchdog_s)
                    try:
                        async for event in self._receive(ws, watchdog):
                            failures = 0
                            yield event
                    finally:
                        watchdog.stop()
                    if watchdog.fired:
                        reason, cause = f"silent for {self.watchdog_s}s", "silent"
            except ConnectionClosed as exc:
                reason = self._closed_reason(exc)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                reason, cause = f"{type(exc).__name__}: {exc}", "error"
            finally:
                if self.connected:
                    self.connected = False
                    FEED_CONNECTED.set(0)
            FEED_DISCONNECTS.labels(cause).inc()
            yield Disconnected(reason)
            failures += 1
            delay = backoff_delay(failures, self.reconnect_max_s)
            log.warning("feed disconnected", extra={"reason": reason, "retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)

    async def _receive(
        self, ws: ClientConnection, watchdog: Watchdog
    ) -> AsyncIterator[MatchMessage | HeartbeatMessage]:
        counted = {t: FEED_MESSAGES.labels(t) for t in ("match", "last_match", "heartbeat")}
        products = self.products
        while True:
            watchdog.waiting_since = time.monotonic()
            try:
                frame = await ws.recv()
            except ConnectionClosed:
                if watchdog.fired:
                    return
                raise
            watchdog.waiting_since = None
            msg = parse_feed_frame(frame)
            if isinstance(msg, MatchMessage | HeartbeatMessage):
                if msg.product_id not in products:
                    self._reject("unknown_product", f"product {msg.product_id}")
                    continue
                counted[msg.type].inc()
                self.last_message_at = time.time()
                yield msg
            elif isinstance(msg, Rejected):
                if msg.reason == "unknown_type":
                    FEED_MESSAGES.labels("other").inc()  # new types may appear at any time
                else:
                    self._reject(msg.reason, msg.detail)
            elif isinstance(msg, SubscriptionsMessage):
                FEED_MESSAGES.labels(msg.type).inc()
                active = {c.name: sorted(c.product_ids) for c in msg.channels}
                log.info("feed subscribed", extra={"channels": json.dumps(active)})
            elif isinstance(msg, ErrorMessage):
                self._reject("server_error", f"{msg.message} {msg.reason}".strip())

    def _reject(self, reason: str, detail: str) -> None:
        FEED_REJECTED.labels(reason).inc()
        self._rejects.warning(reason, "feed frame rejected", reason=reason, detail=detail)

    def _closed_reason(self, exc: ConnectionClosed) -> str:
        code = exc.sent.code if exc.sent else exc.rcvd.code if exc.rcvd else None
        if code in _REFUSAL_CODES:
            self._reject(_REFUSAL_CODES[code], str(exc))
        return f"connection closed ({code}): {exc}"
