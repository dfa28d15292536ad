"""Live ingest: Coinbase trades into exact minute and hourly candles in SQLite.

Per product, trades are applied strictly in trade_id order. A jump in trade_id (a dropped message,
a reconnect, a restart, a heartbeat that knows of newer trades) is filled from REST before anything
later is applied. ``last_trade_id`` only ever advances over trades actually held, so a forged or
premature id can delay a trade but never make one be skipped. Candle deltas are committed with the
cursor in one transaction (see :mod:`appliance.store`).

Commits are few, for the SD card's sake: every ``commit_interval_s`` while trades come in, and at
once for a product whose hour has closed (its prediction waits for that candle). Between commits
the candles in progress live here, and the API and the stream read them from here. How often ingest
commits trades write volume against how fresh the *stored* minute candles are, never durability:
whatever was not committed when the process died is fetched again over REST on the next start.

When storage fails, ingest stops: the feed is closed and the uncommitted trades are let go. When
the :class:`~appliance.storekeeper.StoreKeeper` says the store takes writes again, ingest resumes
from the committed cursor and repairs the gap over REST, as after any outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from appliance.candles import (
    HOUR,
    MINUTE,
    TRADE_GRANULARITIES,
    US,
    Candle,
    CandleRow,
    IngestState,
    Trade,
    bucket_start,
    format_time,
)
from appliance.coinbase.feed import CoinbaseFeed, Connected, Disconnected
from appliance.coinbase.messages import HeartbeatMessage, MatchMessage
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.health import Conditions
from appliance.metrics import (
    FEED_REJECTED,
    GAPS_REPAIRED,
    LAST_TRADE_TIME,
    STORE_COMMITS,
    TRADES_INGESTED,
    TRADES_UNRECOVERABLE,
)
from appliance.settings import Settings
from appliance.store import Store, TradeCommit
from appliance.storekeeper import StoreKeeper

log = logging.getLogger(__name__)

#: Shortest spacing of commits during bursts (catch-up, replays).
MIN_COMMIT_GAP_S = 0.02
#: The candles the models read: when one closes, its product commits at once.
PROMPT_US = min(g for g in TRADE_GRANULARITIES if g > MINUTE) * US
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
    """What one product's ingest holds: the committed cursor, the uncommitted candle deltas, and the
    stored part of each granularity's newest candle (which, with the deltas, is the candle in progress)."""

    product: str
    first_trade_id: int | None = None
    first_time_us: int | None = None  # set when this process started coverage (None when resumed)
    last_trade_id: int | None = None
    last_time_us: int = 0
    pending: dict[tuple[int, int], Candle] = field(default_factory=dict)
    closed: bool = False  # a candle the models read has closed since the last commit
    stored: dict[int, tuple[int, Candle]] = field(default_factory=dict)  # granularity -> (start, candle)

    @classmethod
    def resumed(
        cls, product: str, state: IngestState | None, stored: dict[int, tuple[int, Candle]]
    ) -> ProductCursor:
        if state is None:
            return cls(product)
        return cls(product, state.first_trade_id, None, state.last_trade_id, state.last_trade_time_us,
                   stored=stored)  # fmt: skip

    def apply(self, trade: Trade) -> bool:
        """Take the next trade; True if it should be stored at once: it is the first of a new hour
        (the last one has closed) or the very first (history is back-filled once there is one)."""
        closes = False
        if self.first_trade_id is None:
            self.first_trade_id = trade.trade_id
            self.first_time_us = trade.time_us
            closes = self.closed = True
        elif self.last_time_us and trade.time_us // PROMPT_US > self.last_time_us // PROMPT_US:
            closes = self.closed = True
        self.last_trade_id = trade.trade_id
        self.last_time_us = trade.time_us
        for g in TRADE_GRANULARITIES:
            key = (g, bucket_start(trade.time_us, g))
            candle = self.pending.get(key)
            if candle is None:
                self.pending[key] = Candle.of(trade)
            else:
                candle.add(trade)
        return closes

    def to_commit(self) -> TradeCommit:
        assert self.first_trade_id is not None
        assert self.last_trade_id is not None
        return TradeCommit(self.product, self.pending, self.first_trade_id, self.last_trade_id,
                           self.last_time_us, self.first_time_us)  # fmt: skip

    def settle(self) -> None:
        """The pending deltas are stored: fold the newest buckets' into what is known stored."""
        for g in TRADE_GRANULARITIES:
            start = bucket_start(self.last_time_us, g)
            delta = self.pending.get((g, start))
            if delta is None:
                continue
            known = self.stored.get(g)
            if known is not None and known[0] == start:
                known[1].merge(delta)
            else:
                self.stored[g] = (start, delta)
        self.pending = {}
        self.closed = False

    def live(self, granularity: int) -> CandleRow | None:
        """The candle in progress (stored part and uncommitted trades), None before any trade."""
        if not self.last_time_us:
            return None
        start = bucket_start(self.last_time_us, granularity)
        known = self.stored.get(granularity)
        candle = replace(known[1]) if known is not None and known[0] == start else None
        delta = self.pending.get((granularity, start))
        if delta is not None:
            if candle is None:
                candle = replace(delta)
            else:
                candle.merge(delta)
        if candle is None:
            return None
        return CandleRow(start, candle.open, candle.high, candle.low, candle.close, candle.volume,
                         candle.trades)  # fmt: skip


class Ingester:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        rest: CoinbaseRest,
        feed: CoinbaseFeed | None = None,
        health: Conditions | None = None,
        keeper: StoreKeeper | None = None,
    ):
        self.settings = settings
        self.store = store
        self.rest = rest
        self.health = health or Conditions()  # where ingest reports trouble (shown by /health)
        self.keeper = keeper or StoreKeeper(store, self.health)
        self.feed = feed or CoinbaseFeed.from_settings(settings, self.health)
        #: Told after each commit that stored trades (to look for a closed candle).
        self.listeners: list[Callable[[], None]] = []
        #: Told after each feed message that may have moved a price (the live candle).
        self.trade_listeners: list[Callable[[], None]] = []
        self.cursors: dict[str, ProductCursor] = {p: ProductCursor(p) for p in settings.products}
        self._closing = False  # some cursor is ``closed``
        self._generation = -1  # the store keeper's generation the cursors were read from
        self._last_commit = time.monotonic()
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_report: tuple[float, dict[str, int | None]] = (time.monotonic(), {})
        self._ingested = {
            (p, via): TRADES_INGESTED.labels(p, via) for p in settings.products for via in ("feed", "rest")
        }

    async def run(self) -> None:
        """Ingest until cancelled; whatever is pending is committed on the way out.

        While storage fails, the feed is closed; ingest resumes from the committed cursor.
        """
        housekeeping = asyncio.create_task(self._housekeep())
        try:
            while True:
                await self.keeper.until_writable()
                if not self._resume():
                    continue
                async with contextlib.aclosing(self.feed.events()) as events:
                    async for event in events:
                        if isinstance(event, MatchMessage):
                            await self._on_trade(event.trade())
                            self._tell(self.trade_listeners)
                        elif isinstance(event, HeartbeatMessage):
                            await self._on_heartbeat(event)
                        elif isinstance(event, Connected | Disconnected):
                            self.commit()
                        self._maybe_commit()
                        if not self._store_current:
                            break
                log.warning("ingest stopped: the store failed or was reopened; it resumes from what the "
                            "store holds", extra={"storage": self.keeper.trouble_message})  # fmt: skip
        finally:
            housekeeping.cancel()
            self.commit()

    def _resume(self) -> bool:
        """Cursors from what is committed (uncommitted trades are fetched again); False if unreadable."""
        try:
            held = {p: (self.store.ingest_state(p), self.store.open_candles(p)) for p in self.cursors}
        except sqlite3.Error as exc:
            self.keeper.failed(exc)
            return False
        self.cursors = {p: ProductCursor.resumed(p, *held[p]) for p in self.cursors}
        self._generation = self.keeper.generation
        self._closing = False
        self._last_report = (time.monotonic(), {p: c.last_trade_id for p, c in self.cursors.items()})
        for c in self.cursors.values():
            log.info(
                "ingest resuming" if c.last_trade_id else "ingest starting fresh",
                extra={"product": c.product, "last_trade_id": c.last_trade_id},
            )
        return True

    @property
    def _store_current(self) -> bool:
        """The store takes writes, and is the one the cursors were read from (not reopened, replaced)."""
        return self.keeper.writable and self.keeper.generation == self._generation

    @property
    def connected(self) -> bool:
        return self.feed.connected

    def last_trade_time_us(self, product: str) -> int | None:
        """Event time of the newest trade held (committed or not), None before the first."""
        cursor = self.cursors.get(product)
        return cursor.last_time_us or None if cursor else None

    def live_candle(self, product: str, granularity: int = HOUR) -> CandleRow | None:
        """The candle in progress, committed or not; None before the first trade."""
        cursor = self.cursors.get(product)
        return cursor.live(granularity) if cursor else None

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
            before = c.last_trade_id
            await self._repair(c, hb.last_trade_id)
            if c.last_trade_id < hb.last_trade_id:
                FEED_REJECTED.labels("unconfirmed").inc()
            if c.last_trade_id != before:
                self._tell(self.trade_listeners)

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
        if c.apply(trade):
            self._closing = True
        self._ingested[c.product, via].inc()

    def _maybe_commit(self) -> None:
        """Commit the products whose hour closed (at once), or everything once the interval is up."""
        now = time.monotonic()
        interval_up = now - self._last_commit >= self.settings.commit_interval_s
        if not self._closing and not interval_up:
            return
        wait = self._last_commit + MIN_COMMIT_GAP_S - now
        if wait <= 0:
            self.commit(only_closed=not interval_up)
        elif self._commit_timer is None:  # a closed hour never waits longer than the gap
            self._commit_timer = asyncio.get_running_loop().call_later(wait, self._commit_closed)

    def _commit_closed(self) -> None:
        self._commit_timer = None
        self.commit(only_closed=True)

    def commit(self, *, only_closed: bool = False) -> None:
        """Store what is pending (only the products whose hour closed, if ``only_closed``).

        A storage error is handed to the keeper and pauses ingest; the trades stay uncommitted.
        """
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        due = [c for c in self.cursors.values() if c.pending and (c.closed or not only_closed)]
        self._last_commit = time.monotonic()
        self._closing = False
        if not due or not self._store_current:
            return
        try:
            self.store.commit_trades([c.to_commit() for c in due])
        except sqlite3.Error as exc:
            self.keeper.failed(exc)
            return
        STORE_COMMITS.inc()
        hour_closed = any(c.closed for c in due)
        for c in due:
            c.settle()
            LAST_TRADE_TIME.labels(c.product).set(c.last_time_us / 1e6)
        if hour_closed:  # retention counts market time: look once an hour of it
            self._prune()
        self._tell(self.listeners)

    def _prune(self) -> None:
        try:
            removed = self.store.prune_trade_candles(MINUTE, self.settings.minute_retention_days * 86_400)
        except sqlite3.Error as exc:
            self.keeper.failed(exc)
            return
        if removed:
            log.info("minute candles pruned", extra={"removed": removed})

    @staticmethod
    def _tell(listeners: list[Callable[[], None]]) -> None:
        for listener in listeners:
            listener()

    async def _housekeep(self) -> None:
        """Once a minute: a progress line, and a commit if trades stopped coming."""
        while True:
            await asyncio.sleep(min(REPORT_EVERY_S, self.settings.commit_interval_s))
            if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
                self.commit()
            if time.monotonic() - self._last_report[0] >= REPORT_EVERY_S:
                self._report()

    def _report(self) -> None:
        """One line per product a minute: is data flowing, and how fresh is it."""
        then, ids = self._last_report
        now = time.monotonic()
        for p, c in self.cursors.items():
            gained = (c.last_trade_id or 0) - (ids.get(p) or c.first_trade_id or 0)
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
