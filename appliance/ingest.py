"""Live ingest: Coinbase trades into exact minute and hourly candles in SQLite.

Per product, trades are applied strictly in trade_id order. A jump in trade_id (a dropped message,
a reconnect, a restart, a heartbeat that knows of newer trades) is filled from REST before anything
later is applied. ``last_trade_id`` only ever advances over trades actually held, so a forged or
premature id can delay a trade but never make one be skipped. Candle deltas are committed with the
cursor in one transaction (see :mod:`appliance.store`), when a minute closes and at least every
``commit_interval_s``.

Repairs never stop the reading: each product with a gap has one repair task, and the feed's trades
beyond the gap wait (bounded, ``feed_buffer_frames``) until REST has filled it, while every other
product goes on. REST may lag the feed (a trade the feed shows that REST does not know yet): the
repair retries with back-off, not on every frame; what REST still cannot confirm after
``HOLD_S`` is let go (a later frame or heartbeat asks again). If the held trades would overflow
their bound, that product's are dropped and re-fetched from REST instead.

A product whose heartbeats go on without trades for ``HALT_AFTER_S`` of market time shows as
"trading halted since …" (per product, in /health) until it trades again; a halt asks nothing of
REST, since the heartbeats' ``last_trade_id`` shows nothing is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.candles import (
    MINUTE,
    TRADE_GRANULARITIES,
    US,
    Candle,
    Trade,
    bucket_start,
    format_time,
    to_time_us,
)
from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.feed import CoinbaseFeed, Connected, Disconnected
from appliance.coinbase.messages import HeartbeatMessage, MatchMessage
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.health import Conditions
from appliance.logs import ThrottledLog
from appliance.metrics import (
    FEED_REJECTED,
    GAPS_REPAIRED,
    LAST_TRADE_TIME,
    TRADES_INGESTED,
    TRADES_UNRECOVERABLE,
)
from appliance.products import ProductWatch
from appliance.settings import Settings
from appliance.store import Store

log = logging.getLogger(__name__)

#: Shortest spacing of minute-close commits during bursts (catch-up, replays).
MIN_COMMIT_GAP_S = 0.02
PRUNE_EVERY_S = 600.0
REPORT_EVERY_S = 60.0
#: Wall seconds feed trades (and heartbeat ids) wait for REST to confirm the gap before them.
HOLD_S = 60.0
REPAIR_BACKOFF_MAX_S = 30.0
#: Market seconds of heartbeats without a trade after which a product shows as halted.
HALT_AFTER_S = 1800


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


@dataclass(slots=True)
class Gap:
    """One product's repair: feed trades waiting beyond a gap, and the newest id known to exist."""

    held: dict[int, Trade] = field(default_factory=dict)  # trade_id -> trade, beyond the gap
    low: int = 0  # the lowest held id (0: none held)
    held_since: float = 0.0  # monotonic time the oldest held trade arrived
    target: int = 0  # newest trade id known to exist (a held trade's or a heartbeat's)
    target_seen: float = 0.0  # monotonic time a frame last claimed it
    claims: list[int] = field(default_factory=list)  # ids of frames the next attempt will judge
    asking: bool = False  # an attempt is due or under way (not backing off)
    frontier: int = 0  # the lowest id REST was asked for and did not know (0: none)
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a new gap: ask REST now
    task: asyncio.Task[None] | None = None


def _report_crash(task: asyncio.Task[None]) -> None:
    """A repair that failed on something other than REST: said loudly; the next frame starts another."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("gap repair crashed", exc_info=exc)


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
        #: Which products Coinbase lists; tells the feed which to follow.
        self.products = ProductWatch(rest, settings.products, self.feed.subscribe, self.health)
        self.gaps = {p: Gap() for p in settings.products}
        self._held = 0  # trades held across products, at most ``settings.feed_buffer_frames``
        self._halted: set[str] = set()
        self._watched_from: dict[str, int] = {}  # market time (us) of each product's first heartbeat
        self._unconfirmed_log = ThrottledLog(log)
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
        await self.products.check(attempts=1)  # one try: an unreachable Coinbase must not hold up the start
        helpers = [asyncio.create_task(self._flush_periodically()), asyncio.create_task(self.products.run())]
        try:
            async for event in self.feed.events():
                if isinstance(event, MatchMessage):
                    self._on_trade(event.trade())
                elif isinstance(event, HeartbeatMessage):
                    self._on_heartbeat(event)
                elif isinstance(event, Connected | Disconnected):
                    self.commit()
                    for listener in self.feed_listeners:
                        listener(isinstance(event, Connected))
                self._maybe_commit()
        finally:
            for task in helpers + [g.task for g in self.gaps.values() if g.task]:
                task.cancel()
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

    def _on_trade(self, trade: Trade) -> None:
        c, g = self.cursors[trade.product], self.gaps[trade.product]
        step = next_step(c.last_trade_id, trade.trade_id)
        if step == "duplicate" or trade.trade_id in g.held:
            FEED_REJECTED.labels("duplicate").inc()
        elif step == "repair":
            self._hold(c, g, trade)
        else:
            self._apply(c, trade, "feed")
            if g.held:
                self._release(c, g)

    def _on_heartbeat(self, hb: HeartbeatMessage) -> None:
        c, g = self.cursors[hb.product_id], self.gaps[hb.product_id]
        if c.last_trade_id is not None and hb.last_trade_id > c.last_trade_id:
            self._claim(c, g, hb.last_trade_id)
        if c.pending and bucket_start(c.last_time_us, MINUTE) + MINUTE <= hb.time.timestamp():
            c.minute_closed = True
        if c.product not in self._halted and g.task is None:
            self._check_halt(c, to_time_us(hb.time))

    def _check_halt(self, c: ProductCursor, now_us: int) -> None:
        """Heartbeats without trades for ``HALT_AFTER_S`` of market time: trading is halted."""
        since = c.last_time_us or self._watched_from.setdefault(c.product, now_us)
        if now_us - since >= HALT_AFTER_S * US:
            self._halted.add(c.product)
            flags = ",".join(self.products.halted_by(c.product)) or "trading (as of the last check)"
            self.health.problem(
                "trading", f"trading halted since {format_time(since)}: heartbeats, no trades",
                subject=c.product, coinbase_status=flags, last_trade_id=c.last_trade_id,
            )  # fmt: skip

    def _hold(self, c: ProductCursor, g: Gap, trade: Trade) -> None:
        """Keep a trade that lies beyond a gap until REST fills the gap (or re-sync if too many wait)."""
        tid = trade.trade_id
        if self._held >= self.settings.feed_buffer_frames:
            FEED_REJECTED.labels("buffer_full").inc(len(g.held) + 1)
            self._drop_held(g)
            self.health.problem("ingest", "too many trades wait for a gap repair: re-syncing over REST",
                                subject=c.product, limit=self.settings.feed_buffer_frames)  # fmt: skip
            self._claim(c, g, tid, new_gap=False)
            return
        new_gap = not g.held or tid < g.low  # a hole below those REST was asked about
        g.held[tid] = trade
        self._held += 1
        g.low = tid if new_gap else g.low
        g.held_since = g.held_since or time.monotonic()
        self._claim(c, g, tid, new_gap)

    def _claim(self, c: ProductCursor, g: Gap, trade_id: int, new_gap: bool = False) -> None:
        """A frame shows trade ``trade_id`` exists beyond what ingest holds: have REST fill up to it."""
        g.target = max(g.target, trade_id)
        g.target_seen = time.monotonic()
        if g.frontier and trade_id >= g.frontier and not g.asking and not new_gap:
            self._unconfirmed(c, 1)  # REST said it does not know these yet: counted now, asked later
        else:
            g.claims.append(trade_id)  # judged by the next attempt
            if new_gap:
                g.wake.set()
        if g.task is None:
            g.asking = True
            g.task = asyncio.create_task(self._repair(c, g))
            g.task.add_done_callback(_report_crash)

    async def _repair(self, c: ProductCursor, g: Gap) -> None:
        """Fill the product's gap from REST, the lowest hole first: at once, then, while REST does not
        know the trades yet (it lags the feed, or the id was forged), with back-off.

        A new hole below the held trades (a dropped message while a premature id waits) cuts the
        back-off short: REST knows older trades, and they must not wait for newer ones.
        """
        waiting = False
        try:
            while True:
                if waiting:
                    g.asking = False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(g.wake.wait(), backoff_delay(g.failures, REPAIR_BACKOFF_MAX_S))
                g.wake.clear()
                g.asking = True
                self._let_go(c, g)
                last = c.last_trade_id
                if last is None or (g.target <= last and not g.held):
                    break
                up_to = g.low or g.target  # the lowest hole first (with the trade after it)
                claims, g.claims = g.claims, []
                await self._fetch(c, g, last, up_to)  # run's loop and the flusher commit what it applied
                now_at = c.last_trade_id or 0
                self._unconfirmed(c, sum(1 for x in claims if now_at < x <= up_to))
                g.claims += [x for x in claims if x > max(up_to, now_at)]  # not asked yet: the next attempt
                if g.target <= now_at and not g.held:
                    break
                if now_at < up_to:  # REST does not know up_to yet: wait longer each time it had nothing new
                    g.frontier = min(g.frontier or up_to, up_to)
                    g.failures = 1 if now_at > last else g.failures + 1
                waiting = now_at < up_to or (g.frontier > 0 and (g.low or g.target) >= g.frontier)
        finally:
            g.task, g.asking, g.frontier, g.failures, g.claims = None, False, 0, 0, []
            if not g.held:
                self.health.ok("ingest", subject=c.product)

    async def _fetch(self, c: ProductCursor, g: Gap, after: int, up_to_id: int) -> None:
        """One attempt: REST's trades in (after, up_to_id], merged with the held ones, applied in order."""
        started = time.monotonic()
        try:
            trades = await self.rest.trades_between(c.product, after, up_to_id)
        except CoinbaseRestError as exc:
            log.error(
                "trade gap not repaired; will retry",
                extra={"product": c.product, "after": after, "up_to": up_to_id, "error": str(exc)},
            )
            return
        assert c.last_trade_id is not None  # a gap has a start
        last = c.last_trade_id  # the feed may have moved it on meanwhile
        known = trades[-1].trade_id if trades else 0
        merged: dict[int, tuple[Trade, Literal["feed", "rest"]]] = {t.trade_id: (t, "rest") for t in trades}
        for tid, t in g.held.items():  # held trades fill holes REST left below its newest
            if tid <= known:
                merged.setdefault(tid, (t, "feed"))
        skipped = holes = 0
        previous: str | None = None
        for tid in sorted(k for k in merged if k > last):
            trade, via = merged[tid]
            holes += via == "rest" and previous != "rest"
            skipped += tid - c.last_trade_id - 1
            self._apply(c, trade, via)
            previous = via
        self._release(c, g)
        if holes:  # each run of trades only REST had is one gap filled
            GAPS_REPAIRED.labels(c.product).inc(holes)
        if skipped:
            TRADES_UNRECOVERABLE.labels(c.product).inc(skipped)
        log.info(
            "trade gap repaired" if c.last_trade_id >= g.target else "trade gap repaired in part; REST lags",
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

    def _release(self, c: ProductCursor, g: Gap) -> None:
        """Apply the held trades that now follow on; forget those already covered."""
        last = c.last_trade_id
        if last is None or g.low > last + 1:
            return  # the gap before the held trades is still open
        while (t := g.held.pop(last + 1, None)) is not None:
            self._held -= 1
            self._apply(c, t, "feed")
            last = t.trade_id
        for tid in [k for k in g.held if k <= last]:
            del g.held[tid]
            self._held -= 1
        g.low = min(g.held, default=0)
        if not g.held:
            g.held_since = 0.0

    def _drop_held(self, g: Gap) -> None:
        self._held -= len(g.held)
        g.held.clear()
        g.low, g.held_since = 0, 0.0

    def _let_go(self, c: ProductCursor, g: Gap) -> None:
        """Drop what REST has not confirmed for ``HOLD_S``: a forged id must not be chased forever."""
        now = time.monotonic()
        if g.held and now - g.held_since > HOLD_S:
            dropped = {"product": c.product, "trades": len(g.held), "first": g.low}
            log.warning("held trades never confirmed by REST; dropped", extra=dropped)
            self._drop_held(g)
        if now - g.target_seen > HOLD_S:
            g.target = 0

    def _unconfirmed(self, c: ProductCursor, count: int) -> None:
        if count:
            FEED_REJECTED.labels("unconfirmed").inc(count)
            self._unconfirmed_log.warning(
                c.product, "trade id ahead of what REST confirms; held, not applied",
                product=c.product, last_trade_id=c.last_trade_id, count=count,
            )  # fmt: skip

    def _apply(self, c: ProductCursor, trade: Trade, via: Literal["feed", "rest"]) -> None:
        c.apply(trade)
        self._ingested[c.product, via].inc()
        if self._halted and c.product in self._halted:
            self._halted.discard(c.product)
            self.health.ok("trading", subject=c.product)

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
