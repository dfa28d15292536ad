"""Live ingest: Coinbase trades into exact minute and hourly candles in SQLite.

Per product, trades are applied strictly in trade_id order. A jump in trade_id (a dropped message,
a reconnect, a restart, a heartbeat that knows of newer trades) is filled from REST before anything
later is applied. ``last_trade_id`` only ever advances over trades actually held, so a forged or
premature id can delay a trade but never make one be skipped. Candle deltas are committed with the
cursor in one transaction (see :mod:`appliance.store`).

Commits are few, for the SD card's sake: every ``commit_interval_s`` while trades come in, and at
once for a product whose candle of the shortest horizon has closed (its predictions wait for that
candle; an hour's close is also a quarter's). Between commits the candles in progress live here,
and the API and the stream read them from here. How often ingest commits trades write volume
against how fresh the *stored* minute candles are, never durability: whatever was not committed
when the process died is fetched again over REST on the next start.

When storage fails, ingest stops: the feed is closed, repairs are cancelled and the uncommitted
trades are let go. When the :class:`~appliance.storekeeper.StoreKeeper` says the store takes writes
again, ingest resumes from the committed cursor and repairs the gap over REST, as after any outage.

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
    STORE_COMMITS,
    TRADES_INGESTED,
    TRADES_UNRECOVERABLE,
)
from appliance.products import ProductWatch
from appliance.settings import Settings
from appliance.store import Store, TradeCommit
from appliance.storekeeper import StoreKeeper

log = logging.getLogger(__name__)

#: Shortest spacing of commits during bursts (catch-up, replays).
MIN_COMMIT_GAP_S = 0.02
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
    """What one product's ingest holds: the committed cursor, the uncommitted candle deltas, and the
    stored part of each granularity's newest candle (which, with the deltas, is the candle in progress)."""

    product: str
    first_trade_id: int | None = None
    first_time_us: int | None = None  # set when this process started coverage (None when resumed)
    last_trade_id: int | None = None
    last_time_us: int = 0
    last_price: float | None = None  # of the newest trade held (None when resumed, until one arrives)
    pending: dict[tuple[int, int], Candle] = field(default_factory=dict)
    closed: bool = False  # a candle the models read has closed since the last commit
    stored: dict[int, tuple[int, Candle]] = field(default_factory=dict)  # granularity -> (start, candle)
    prompt_s: int = HOUR  # the shortest horizon: the first trade after one of its closes commits at once

    @classmethod
    def resumed(
        cls, product: str, state: IngestState | None, stored: dict[int, tuple[int, Candle]], prompt_s: int
    ) -> ProductCursor:
        if state is None:
            return cls(product, prompt_s=prompt_s)
        return cls(product, state.first_trade_id, None, state.last_trade_id, state.last_trade_time_us,
                   stored=stored, prompt_s=prompt_s)  # fmt: skip

    def apply(self, trade: Trade) -> bool:
        """Take the next trade; True if it should be stored at once: it is the first after a close of
        the shortest horizon's candle, or the very first (history is back-filled once there is one)."""
        closes = False
        if self.first_trade_id is None:
            self.first_trade_id = trade.trade_id
            self.first_time_us = trade.time_us
            closes = self.closed = True
        elif self.last_time_us and trade.time_us // (self.prompt_s * US) > self.last_time_us // (
            self.prompt_s * US
        ):
            closes = self.closed = True
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
        keeper: StoreKeeper | None = None,
    ):
        self.settings = settings
        self.store = store
        self.rest = rest
        self.health = health or Conditions()  # where ingest reports trouble (shown by /health)
        self.keeper = keeper or StoreKeeper(store, self.health)
        self.feed = feed or CoinbaseFeed.from_settings(settings, self.health)
        #: Which products Coinbase lists; tells the feed which to follow.
        self.products = ProductWatch(rest, settings.products, self.feed.subscribe, self.health)
        self.gaps = {p: Gap() for p in settings.products}
        self._held = 0  # trades held across products, at most ``settings.feed_buffer_frames``
        self._halted: set[str] = set()
        self._watched_from: dict[str, int] = {}  # market time (us) of each product's first heartbeat
        self._unconfirmed_log = ThrottledLog(log)
        #: Told after each commit that stored trades (to look for a closed candle).
        self.listeners: list[Callable[[], None]] = []
        #: Told after each feed message or repair that may have moved a price (the live candle).
        self.trade_listeners: list[Callable[[], None]] = []
        #: Told True / False as the feed connects and disconnects (False too while storage pauses it).
        self.feed_listeners: list[Callable[[bool], None]] = []
        #: The shortest horizon: when one of its candles closes, the product commits at once.
        self._prompt_s = min(settings.horizons)
        self.cursors = {p: ProductCursor(p, prompt_s=self._prompt_s) for p in settings.products}
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
        await self.products.check(attempts=1)  # one try: an unreachable Coinbase must not hold up the start
        helpers = [asyncio.create_task(self._housekeep()), asyncio.create_task(self.products.run())]
        try:
            while True:
                await self.keeper.until_writable()
                if not self._resume():
                    continue
                async with contextlib.aclosing(self.feed.events()) as events:
                    async for event in events:
                        if isinstance(event, MatchMessage):
                            self._on_trade(event.trade())
                            self._tell(self.trade_listeners)
                        elif isinstance(event, HeartbeatMessage):
                            self._on_heartbeat(event)
                        elif isinstance(event, Connected | Disconnected):
                            self.commit()
                            self._tell_feed(isinstance(event, Connected))
                        self._maybe_commit()
                        if not self._store_current:
                            break
                self._stop_repairs()
                self._tell_feed(False)
                log.warning("ingest stopped: the store failed or was reopened; it resumes from what the "
                            "store holds", extra={"storage": self.keeper.trouble_message})  # fmt: skip
        finally:
            for task in helpers:
                task.cancel()
            self._stop_repairs()
            self.commit()

    def _resume(self) -> bool:
        """Cursors from what is committed (uncommitted trades are fetched again); False if unreadable."""
        try:
            held = {p: (self.store.ingest_state(p), self.store.open_candles(p)) for p in self.cursors}
        except sqlite3.Error as exc:
            self.keeper.failed(exc)
            return False
        self.cursors = {p: ProductCursor.resumed(p, *held[p], self._prompt_s) for p in self.cursors}
        self._generation = self.keeper.generation
        self._closing = False
        self._last_report = (time.monotonic(), {p: c.last_trade_id for p, c in self.cursors.items()})
        for c in self.cursors.values():
            log.info(
                "ingest resuming" if c.last_trade_id else "ingest starting fresh",
                extra={"product": c.product, "last_trade_id": c.last_trade_id},
            )
        return True

    def _stop_repairs(self) -> None:
        """Cancel every repair and let its held trades go: they are fetched again after the cursor."""
        for g in self.gaps.values():
            if g.task is not None:
                g.task.cancel()
        self.gaps = {p: Gap() for p in self.cursors}
        self._held = 0

    @property
    def _store_current(self) -> bool:
        """The store takes writes, and is the one the cursors were read from (not reopened, replaced)."""
        return self.keeper.writable and self.keeper.generation == self._generation

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

    def live_candle(self, product: str, granularity: int = HOUR) -> CandleRow | None:
        """The candle in progress, committed or not; None before the first trade."""
        cursor = self.cursors.get(product)
        return cursor.live(granularity) if cursor else None

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
                await self._fetch(c, g, last, up_to)
                now_at = c.last_trade_id or 0
                if now_at != last:  # applied outside run's loop: tell and commit as it would
                    self._tell(self.trade_listeners)
                    self._maybe_commit()
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
        if c.apply(trade):
            self._closing = True
        self._ingested[c.product, via].inc()
        if self._halted and c.product in self._halted:
            self._halted.discard(c.product)
            self.health.ok("trading", subject=c.product)

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

    def _tell_feed(self, connected: bool) -> None:
        for listener in self.feed_listeners:
            listener(connected)

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
