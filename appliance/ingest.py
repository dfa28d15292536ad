"""Live ingest: Coinbase trades into exact minute and hourly candles in SQLite.

Per product, trades are applied strictly in trade_id order. A jump in trade_id (a dropped message,
a reconnect, a restart, a heartbeat that knows of newer trades) is filled from REST before anything
later is applied. ``last_trade_id`` only ever advances over trades actually held, so a forged or
premature id can delay a trade but never make one be skipped. Candle deltas are committed with the
cursor in one transaction (see :mod:`appliance.store`), when a minute closes and at least every
``commit_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.candles import MINUTE, TRADE_GRANULARITIES, Candle, Trade, bucket_start, format_time
from appliance.coinbase.feed import CoinbaseFeed, Connected, Disconnected
from appliance.coinbase.messages import HeartbeatMessage, MatchMessage
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.health import Conditions
from appliance.metrics import (
    FEED_REJECTED,
    GAPS_REPAIRED,
    LAST_TRADE_TIME,
    TRADES_INGESTED,
    TRADES_UNRECOVERABLE,
)
from appliance.settings import Settings
from appliance.store import Store

log = logging.getLogger(__name__)

#: Shortest spacing of minute-close commits during bursts (catch-up, replays).
MIN_COMMIT_GAP_S = 0.02
PRUNE_EVERY_S = 600.0
REPORT_EVERY_S = 60.0


Step = Literal["start", "apply", "duplicate", "repair"]


def next_step(last_trade_id: int | None, trade_id: int) -> Step:
    """What a trade from the feed calls for, given the id ingest holds up to (None: nothing yet).

    ``repair``: trades between are missing and must come from REST before this one can be applied.
    """
    if last_trade_id is None:
        return "start"
    if trade_id <= last_trade_id:
        return "duplicate"
    return "apply" if trade_id == last_trade_id + 1 else "repair"


@dataclass(slots=True)
class ProductCursor:
    """What one product's ingest holds: the committed cursor and the uncommitted candle deltas."""

    product: str
    first_trade_id: int | None = None
    first_time_us: int | None = None  # set when this process started coverage (None when resumed)
    last_trade_id: int | None = None
    last_time_us: int = 0
    last_price: float | None = None  # of the newest trade held (None when resumed, until one arrives)
    pending: dict[tuple[int, int], Candle] = field(default_factory=dict)
    minute_closed: bool = False

    def apply(self, trade: Trade) -> None:
        if self.first_trade_id is None:
            self.first_trade_id = trade.trade_id
            self.first_time_us = trade.time_us
        elif self.last_time_us and bucket_start(trade.time_us, MINUTE) > bucket_start(
            self.last_time_us, MINUTE
        ):
            self.minute_closed = True
        self.last_trade_id = trade.trade_id
        self.last_time_us = trade.time_us
        self.last_price = trade.price
        for g in TRADE_GRANULARITIES:
            key = (g, bucket_start(trade.time_us, g))
            candle = self.pending.get(key)
            if candle is None:
                self.pending[key] = Candle.of(trade)
            else:
                candle.add(trade)


class Ingester:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        rest: CoinbaseRest,
        feed: CoinbaseFeed | None = None,
        health: Conditions | None = None,
    ):
        self.settings = settings
        self.store = store
        self.rest = rest
        self.health = health or Conditions()  # where ingest reports trouble (shown by /health)
        self.feed = feed or CoinbaseFeed.from_settings(settings, self.health)
        #: Told after each commit that stored trades (to look for a closed candle, stream the price).
        self.listeners: list[Callable[[], None]] = []
        #: Told True / False as the feed connects and disconnects.
        self.feed_listeners: list[Callable[[bool], None]] = []
        self.cursors: dict[str, ProductCursor] = {}
        for product in settings.products:
            state = store.ingest_state(product)
            cursor = ProductCursor(product)
            if state:
                cursor.first_trade_id = state.first_trade_id
                cursor.last_trade_id = state.last_trade_id
                cursor.last_time_us = state.last_trade_time_us
            self.cursors[product] = cursor
        self._last_commit = 0.0
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_prune = 0.0
        self._last_report = (time.monotonic(), {p: c.last_trade_id for p, c in self.cursors.items()})
        self._ingested = {
            (p, via): TRADES_INGESTED.labels(p, via) for p in settings.products for via in ("feed", "rest")
        }

    async def run(self) -> None:
        """Ingest until cancelled; whatever is pending is committed on the way out."""
        for c in self.cursors.values():
            log.info(
                "ingest resuming" if c.last_trade_id else "ingest starting fresh",
                extra={"product": c.product, "last_trade_id": c.last_trade_id},
            )
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            async for event in self.feed.events():
                if isinstance(event, MatchMessage):
                    await self._on_trade(event.trade())
                elif isinstance(event, HeartbeatMessage):
                    await self._on_heartbeat(event)
                elif isinstance(event, Connected | Disconnected):
                    self.commit()
                    for listener in self.feed_listeners:
                        listener(isinstance(event, Connected))
                self._maybe_commit()
        finally:
            flusher.cancel()
            self.commit()

    @property
    def connected(self) -> bool:
        return self.feed.connected

    def last_prices(self) -> dict[str, float]:
        """The newest trade's price per product (those with a trade since this process started)."""
        return {p: c.last_price for p, c in self.cursors.items() if c.last_price is not None}

    def last_trade_time_us(self, product: str) -> int | None:
        """Event time of the newest trade held (committed or not), None before the first."""
        cursor = self.cursors.get(product)
        return cursor.last_time_us or None if cursor else None

    async def _on_trade(self, trade: Trade) -> None:
        c = self.cursors[trade.product]
        step = next_step(c.last_trade_id, trade.trade_id)
        if step == "duplicate":
            FEED_REJECTED.labels("duplicate").inc()
            return
        if step == "repair":
            assert c.last_trade_id is not None
            await self._repair(c, trade.trade_id - 1)
            step = next_step(c.last_trade_id, trade.trade_id)
        if step in ("start", "apply"):
            self._apply(c, trade, "feed")
        else:
            # REST does not know the trades before it (yet): hold off; a later frame retries the repair.
            FEED_REJECTED.labels("unconfirmed").inc()
            log.warning(
                "trade id ahead of what REST confirms; not applied",
                extra={"product": c.product, "trade_id": trade.trade_id, "last_trade_id": c.last_trade_id},
            )

    async def _on_heartbeat(self, hb: HeartbeatMessage) -> None:
        c = self.cursors[hb.product_id]
        if c.last_trade_id is not None and hb.last_trade_id > c.last_trade_id:
            await self._repair(c, hb.last_trade_id)
            if c.last_trade_id < hb.last_trade_id:
                FEED_REJECTED.labels("unconfirmed").inc()
        if c.pending and bucket_start(c.last_time_us, MINUTE) + MINUTE <= hb.time.timestamp():
            c.minute_closed = True

    async def _repair(self, c: ProductCursor, up_to_id: int) -> None:
        assert c.last_trade_id is not None
        after = c.last_trade_id
        started = time.monotonic()
        try:
            trades = await self.rest.trades_between(c.product, after, up_to_id)
        except CoinbaseRestError as exc:
            log.error(
                "trade gap not repaired; will retry on the next frame",
                extra={"product": c.product, "after": after, "up_to": up_to_id, "error": str(exc)},
            )
            return
        skipped = 0
        for t in trades:
            skipped += t.trade_id - c.last_trade_id - 1
            self._apply(c, t, "rest")
        if trades:
            GAPS_REPAIRED.labels(c.product).inc()
        if skipped:
            TRADES_UNRECOVERABLE.labels(c.product).inc(skipped)
        log.info(
            "trade gap repaired",
            extra={
                "product": c.product,
                "after": after,
                "up_to": up_to_id,
                "fetched": len(trades),
                "unrecoverable": skipped,
                "now_at": c.last_trade_id,
                "ms": round((time.monotonic() - started) * 1000, 1),
            },
        )

    def _apply(self, c: ProductCursor, trade: Trade, via: Literal["feed", "rest"]) -> None:
        c.apply(trade)
        self._ingested[c.product, via].inc()

    def _maybe_commit(self) -> None:
        if not any(c.minute_closed for c in self.cursors.values()):
            return
        wait = self._last_commit + MIN_COMMIT_GAP_S - time.monotonic()
        if wait <= 0:
            self.commit()
        elif self._commit_timer is None:  # a closed minute never waits longer than the gap
            self._commit_timer = asyncio.get_running_loop().call_later(wait, self.commit)

    def commit(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        committed = False
        for c in self.cursors.values():
            if not c.pending:
                continue
            assert c.first_trade_id is not None
            assert c.last_trade_id is not None
            self.store.commit_trades(
                c.product,
                c.pending,
                first_trade_id=c.first_trade_id,
                last_trade_id=c.last_trade_id,
                last_trade_time_us=c.last_time_us,
                first_trade_time_us=c.first_time_us,
            )
            LAST_TRADE_TIME.labels(c.product).set(c.last_time_us / 1e6)
            c.pending = {}
            c.minute_closed = False
            committed = True
        self._last_commit = time.monotonic()
        if committed:
            for listener in self.listeners:
                listener()

    async def _flush_periodically(self) -> None:
        retention_s = self.settings.minute_retention_days * 86_400
        while True:
            await asyncio.sleep(min(self.settings.commit_interval_s, MIN_COMMIT_GAP_S * 4))
            if time.monotonic() - self._last_commit >= self.settings.commit_interval_s or any(
                c.minute_closed for c in self.cursors.values()
            ):
                self.commit()
            if time.monotonic() - self._last_report[0] >= REPORT_EVERY_S:
                self._report()
            if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = time.monotonic()
                removed = self.store.prune_trade_candles(MINUTE, retention_s)
                if removed:
                    log.info("minute candles pruned", extra={"removed": removed})

    def _report(self) -> None:
        """One line per product a minute: is data flowing, and how fresh is it."""
        then, ids = self._last_report
        now = time.monotonic()
        for p, c in self.cursors.items():
            gained = (c.last_trade_id or 0) - (ids[p] or c.first_trade_id or 0)
            log.info(
                "ingest progress",
                extra={
                    "product": p,
                    "connected": self.feed.connected,
                    "last_trade_id": c.last_trade_id,
                    "trades_per_min": round(gained * 60 / (now - then)),
                    "newest_trade": format_time(c.last_time_us) if c.last_time_us else None,
                },
            )
        self._last_report = (now, {p: c.last_trade_id for p, c in self.cursors.items()})
