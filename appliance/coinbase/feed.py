"""Coinbase Exchange WebSocket feed client: subscribe, read without pause, watch, reconnect forever.

It yields only validated trade and heartbeat messages plus connection events; every other frame is
counted and logged here, so the ingester deals in facts.

* **Reading never waits for the consumer.** A reader task takes frames off the socket as they come
  into a bounded buffer the consumer drains; a consumer busy elsewhere (a commit, a burst) never
  leaves the socket unread long enough for Coinbase to drop us as a slow consumer (documented:
  ``ErrSlowConsume``). If the buffer would overflow, frames are dropped, counted and said once
  (``ingest`` in /health): the trade-id gaps they leave are repaired over REST like any other.
* **A refused subscription never silences the rest.** Coinbase answers a subscribe naming a product
  it does not offer with ``{"type":"error","message":"Failed to subscribe","reason":"X is not a
  valid product"}`` and ignores the *whole* subscribe (documented example; the whole-subscribe part
  is from coinbase-pro-node#174). Whether it then closes the socket is not documented: both are
  handled. The named product is left out and the others are subscribed again at once; if the reason
  names none of ours, each product is subscribed on its own so the refused one shows itself (this
  relies on one reply per subscribe, in order: assumed). Refused products are reported per product.
* **The wrong protocol is refused.** A frame of the Advanced Trade protocol ends the feed with
  :class:`FeedProtocolError` naming the Exchange feed's URL; retrying would not help.
* **Silence and outages.** A feed silent longer than the watchdog is re-dialled; reconnects back off
  exponentially with full jitter, forever. An unreachable Coinbase is reported once (host, last
  error, next retry), not per retry.

Documented limits this stays within: 8 connection attempts a second per IP, 100 client messages a
second, 10 subscriptions per product and channel; one connection carries every product.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.messages import (
    ErrorMessage,
    HeartbeatMessage,
    MatchMessage,
    Rejected,
    SubscriptionsMessage,
    parse_feed_frame,
)
from appliance.health import Conditions
from appliance.helpers.config import SettingRejected
from appliance.logs import ThrottledLog
from appliance.metrics import FEED_CONNECTED, FEED_CONNECTS, FEED_DISCONNECTS, FEED_MESSAGES, FEED_REJECTED
from appliance.settings import EXCHANGE_FEED_URL, Settings

log = logging.getLogger(__name__)

CHANNELS = ("matches", "heartbeat")
#: Close codes that mean the server sent something we refuse: counted as a rejected frame.
_REFUSAL_CODES = {1009: "frame_too_large", 1007: "protocol_error", 1002: "protocol_error"}
#: Frames websockets itself may hold before our reader takes them (Coinbase asks for a large buffer).
_LIBRARY_QUEUE = 256
#: Seconds without a dropped message before ingest counts as caught up again (one line per episode).
CAUGHT_UP_AFTER_S = 10.0


class FeedProtocolError(SettingRejected):
    """The feed URL speaks another protocol than the Exchange feed's: reconnecting cannot help."""


@dataclass(frozen=True, slots=True)
class Connected:
    url: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


FeedEvent = MatchMessage | HeartbeatMessage | Connected | Disconnected


class Watchdog:
    """Closes a connection on which the reader has waited for a frame longer than ``timeout_s``.

    One task per connection, so receiving a frame costs two assignments.
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


class _Buffer:
    """Messages read off the socket, waiting for the consumer; bounded, it drops rather than waits."""

    def __init__(self, size: int) -> None:
        self.items: deque[MatchMessage | HeartbeatMessage] = deque()
        self.size = size
        self.ready = asyncio.Event()
        self.closed = False

    def put(self, msg: MatchMessage | HeartbeatMessage) -> bool:
        if len(self.items) >= self.size:
            return False
        self.items.append(msg)
        self.ready.set()
        return True

    def close(self) -> None:
        self.closed = True
        self.ready.set()


class CoinbaseFeed:
    def __init__(
        self,
        url: str,
        products: Sequence[str],
        *,
        watchdog_s: float = 10.0,
        reconnect_max_s: float = 30.0,
        max_frame_bytes: int = 1 << 20,
        buffer_frames: int = 10_000,
        health: Conditions | None = None,
    ) -> None:
        self.url = url
        self.host = urlsplit(url).netloc
        self.products = tuple(products)  # what ingest wants subscribed (see :meth:`subscribe`)
        self.watchdog_s = watchdog_s
        self.reconnect_max_s = reconnect_max_s
        self.max_frame_bytes = max_frame_bytes
        self.buffer_frames = buffer_frames
        self.health = health or Conditions()
        self.connected = False  # subscribed to at least one product
        self.last_message_at: float | None = None  # time.time() of the newest valid message
        #: Products Coinbase refused to subscribe, with its reason (left out until ingest asks again).
        self.refused: dict[str, str] = {}
        self.dropped = 0  # messages the full buffer could not take (their gaps go to REST repair)
        self._dropped_at = 0.0
        self._rejects = ThrottledLog(log)
        self._changed = asyncio.Event()
        self._accepting: frozenset[str] = frozenset()  # products whose messages are taken
        self._sent: set[str] = set()  # products subscribed on this connection (or asked to be)
        self._pending: deque[tuple[str, ...]] = deque()  # subscribes awaiting their reply, in order
        self._one_by_one = False  # a refusal named no product: subscribe each on its own

    @classmethod
    def from_settings(cls, settings: Settings, health: Conditions | None = None) -> CoinbaseFeed:
        return cls(
            settings.coinbase_ws_url,
            settings.products,
            watchdog_s=settings.feed_watchdog_s,
            reconnect_max_s=settings.reconnect_max_s,
            buffer_frames=settings.feed_buffer_frames,
            health=health,
        )

    def subscribe(self, products: Iterable[str]) -> None:
        """Follow these products from now on (on the open connection at once): what ingest wants.

        Asking again for a product Coinbase refused tries it again.
        """
        self.products = tuple(products)
        self.refused = {p: r for p, r in self.refused.items() if p not in self.products}
        self._changed.set()

    @property
    def wanted(self) -> list[str]:
        return [p for p in self.products if p not in self.refused]

    async def events(self) -> AsyncGenerator[FeedEvent, None]:
        failures = 0
        while True:
            reason, cause = "closed", "closed"
            try:
                async with websockets.connect(
                    self.url,
                    max_size=self.max_frame_bytes,
                    max_queue=_LIBRARY_QUEUE,
                    open_timeout=10,
                    close_timeout=2,
                    ping_interval=20,
                    ping_timeout=20,
                ) as ws:
                    FEED_CONNECTS.inc()
                    log.info("feed connected", extra={"url": self.url, "products": ",".join(self.wanted)})
                    yield Connected(self.url)
                    buffer = _Buffer(self.buffer_frames)
                    watchdog = Watchdog(ws, self.watchdog_s)
                    reader = asyncio.create_task(self._read(ws, buffer, watchdog))
                    control = asyncio.create_task(self._keep_subscribed(ws))
                    try:
                        async for event in self._drain(buffer, reader):
                            failures = 0
                            yield event
                    finally:
                        watchdog.stop()
                        reader.cancel()
                        control.cancel()
                    if watchdog.fired:
                        reason, cause = f"silent for {self.watchdog_s}s", "silent"
            except ConnectionClosed as exc:
                reason = self._closed_reason(exc)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                reason, cause = f"{type(exc).__name__}: {exc}", "error"
            finally:
                self._sent, self._pending, self._accepting = set(), deque(), frozenset()
                if self.connected:
                    self.connected = False
                    FEED_CONNECTED.set(0)
            FEED_DISCONNECTS.labels(cause).inc()
            failures += 1
            delay = backoff_delay(failures, self.reconnect_max_s)
            if cause == "error":
                self.health.problem("coinbase", f"Coinbase feed unreachable ({self.host})", last_error=reason,
                                    failures=failures, next_retry_s=round(delay, 2))  # fmt: skip
            # Each retry at INFO: the WARNING is the health line, once per outage.
            log.info("feed disconnected", extra={"host": self.host, "reason": reason,
                                                 "retry_in_s": round(delay, 2)})  # fmt: skip
            yield Disconnected(reason)
            await asyncio.sleep(delay)

    async def _drain(
        self, buffer: _Buffer, reader: asyncio.Task[None]
    ) -> AsyncIterator[MatchMessage | HeartbeatMessage]:
        """What the reader buffered, in order; when the reader ends, its error (a close) is raised."""
        items = buffer.items
        while True:
            while items:
                yield items.popleft()
            if self.dropped and time.monotonic() - self._dropped_at > CAUGHT_UP_AFTER_S:
                self.dropped = 0
                self.health.ok("ingest")
            if buffer.closed:
                await reader  # raises what ended the connection
                return
            buffer.ready.clear()
            await buffer.ready.wait()

    async def _read(self, ws: ClientConnection, buffer: _Buffer, watchdog: Watchdog) -> None:
        """Every frame, as it arrives: validated, counted, trades and heartbeats into the buffer."""
        counted = {t: FEED_MESSAGES.labels(t) for t in ("match", "last_match", "heartbeat")}
        try:
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
                    if msg.product_id not in self._accepting:
                        self._reject("unknown_product", f"product {msg.product_id}")
                        continue
                    counted[msg.type].inc()
                    self.last_message_at = time.time()
                    if not buffer.put(msg):
                        self._overflow()
                elif isinstance(msg, Rejected):
                    self._on_rejected(msg)
                elif isinstance(msg, SubscriptionsMessage):
                    self._on_subscriptions(msg)
                elif isinstance(msg, ErrorMessage):
                    self._on_error(msg)
        finally:
            buffer.close()

    async def _keep_subscribed(self, ws: ClientConnection) -> None:
        """Keep the connection's subscription equal to what is wanted (less what Coinbase refused)."""
        while True:
            self._changed.clear()
            wanted = self.wanted
            gone = sorted(self._sent - set(wanted))
            if gone:
                self._sent -= set(gone)
                self._accepting -= set(gone)
                await self._send(ws, "unsubscribe", gone)
            new = [p for p in wanted if p not in self._sent]
            if new:
                self._sent |= set(new)
                self._accepting |= set(new)
                for request in [[p] for p in new] if self._one_by_one else [new]:
                    await self._send(ws, "subscribe", request)
            await self._changed.wait()

    async def _send(self, ws: ClientConnection, kind: str, products: list[str]) -> None:
        self._pending.append(tuple(products))  # each subscribe and unsubscribe is answered once
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close and ends the connection
            await ws.send(json.dumps({"type": kind, "product_ids": products, "channels": list(CHANNELS)}))

    def _on_subscriptions(self, msg: SubscriptionsMessage) -> None:
        FEED_MESSAGES.labels(msg.type).inc()
        if self._pending:
            self._pending.popleft()
        active = {c.name: sorted(c.product_ids) for c in msg.channels}
        log.info("feed subscribed", extra={"channels": json.dumps(active)})
        if active.get("matches") and not self.connected:
            self.connected = True
            FEED_CONNECTED.set(1)
            self.health.ok("coinbase")

    def _on_error(self, msg: ErrorMessage) -> None:
        if msg.message != "Failed to subscribe":
            if "slow" in f"{msg.message} {msg.reason}".lower():  # ErrSlowConsume: we will be dropped
                log.warning("coinbase says we read too slowly", extra={"message": msg.message})
            self._reject("server_error", f"{msg.message} {msg.reason}".strip())
            return
        request = self._pending.popleft() if self._pending else tuple(self._sent)
        named = [p for p in request if re.search(rf"(?<![A-Z0-9-]){re.escape(p)}(?![A-Z0-9-])", msg.reason)]
        refused = named or (list(request) if len(request) == 1 else [])
        self._sent -= set(request)  # the whole subscribe was ignored: the others are asked for again
        self._accepting -= set(refused)
        if not refused:
            self._one_by_one = True
        for p in refused:
            self.refused[p] = msg.reason
            self.health.problem("product", "Coinbase refused to subscribe it: left out of the feed",
                                subject=p, reason=msg.reason)  # fmt: skip
        log.warning(
            "coinbase refused a subscription",
            extra={"reason": msg.reason, "refused": ",".join(refused) or "?", "requested": len(request)},
        )
        self._changed.set()

    def _on_rejected(self, msg: Rejected) -> None:
        if msg.reason == "unknown_type":
            FEED_MESSAGES.labels("other").inc()  # new types may appear at any time
        elif msg.reason == "advanced_trade":
            raise FeedProtocolError(
                f"CRYPTOPI_COINBASE_WS_URL={self.url} speaks Coinbase's Advanced Trade protocol "
                f"({msg.detail}); cryptopi reads the Exchange feed: set {EXCHANGE_FEED_URL}"
            )
        else:
            self._reject(msg.reason, msg.detail)

    def _overflow(self) -> None:
        self.dropped += 1
        self._dropped_at = time.monotonic()
        FEED_REJECTED.labels("buffer_full").inc()
        self.health.problem("ingest", "ingest fell behind the feed: messages dropped, re-synced over REST",
                            buffer_frames=self.buffer_frames, dropped=self.dropped)  # fmt: skip

    def _reject(self, reason: str, detail: str) -> None:
        FEED_REJECTED.labels(reason).inc()
        self._rejects.warning(reason, "feed frame rejected", reason=reason, detail=detail)

    def _closed_reason(self, exc: ConnectionClosed) -> str:
        code = exc.sent.code if exc.sent else exc.rcvd.code if exc.rcvd else None
        if code in _REFUSAL_CODES:
            self._reject(_REFUSAL_CODES[code], str(exc))
        return f"connection closed ({code}): {exc}"
