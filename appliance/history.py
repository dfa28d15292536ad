"""History into the store: Coinbase REST candles (``backfill``), candle CSV files (``import-csv``), and
the upkeep that keeps the hours the models need whole while the appliance runs (:class:`HistoryKeeper`).

Loading is idempotent: a candle already stored with the same values is left alone, so running either
twice changes nothing; a corrected candle is updated and counted as changed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from appliance.candle_csv import read_candle_csv
from appliance.candles import HOUR, US
from appliance.coinbase.rest import (
    MAX_CANDLES_PER_REQUEST,
    CoinbaseRest,
    CoinbaseRestError,
    validate_granularity,
)
from appliance.features import WINDOW
from appliance.health import Conditions
from appliance.store import Store, UpsertResult
from appliance.storekeeper import StoreKeeper

log = logging.getLogger(__name__)
CSV_CHUNK = 5000


@dataclass(slots=True)
class LoadResult:
    requests: int = 0
    rows: int = 0
    inserted: int = 0
    changed: int = 0
    unchanged: int = 0

    def __str__(self) -> str:
        via = f" from {self.requests} requests" if self.requests else ""
        counts = f"{self.inserted} new, {self.changed} changed, {self.unchanged} unchanged"
        return f"{self.rows} candles{via}: {counts}"

    def add(self, r: UpsertResult) -> None:
        self.rows += r.inserted + r.changed + r.unchanged
        self.inserted += r.inserted
        self.changed += r.changed
        self.unchanged += r.unchanged


async def backfill(
    store: Store,
    rest: CoinbaseRest,
    product: str,
    granularity: int,
    start: int,
    end: int,
    *,
    now: float | None = None,
    progress: bool = True,
    result: LoadResult | None = None,
) -> LoadResult:
    """Candles with bucket start in [start, end), but never the bucket still open at ``now``.

    Counted into ``result`` as they are stored, so an interrupted run can say what it stored.
    """
    validate_granularity(granularity)
    start -= start % granularity
    current_bucket = int(now if now is not None else time.time()) // granularity * granularity
    end = min(end, current_bucket)
    if end <= start:
        raise ValueError("nothing to back-fill: the range is empty or still in progress")
    step = MAX_CANDLES_PER_REQUEST * granularity
    windows = range(start, end, step)
    if result is None:
        result = LoadResult()
    bar = tqdm(windows, desc=f"backfill {product} {granularity}s", unit="req", disable=not progress)
    for w in bar:
        rows = await rest.candles(product, granularity, w, min(w + step, end))
        result.requests += 1
        result.add(store.upsert_history(product, granularity, rows, "coinbase"))
        bar.set_postfix(rows=result.rows, new=result.inserted)
    log.info("backfill done", extra={"product": product, "granularity": granularity, **asdict(result)})
    return result


def import_csv(
    store: Store, path: Path, product: str, granularity: int, *, progress: bool = True
) -> LoadResult:
    validate_granularity(granularity)
    result = LoadResult()
    chunk = []
    with tqdm(desc=f"import {path.name}", unit="row", disable=not progress) as bar:
        for candle in read_candle_csv(path, granularity):
            chunk.append(candle.row())
            if len(chunk) == CSV_CHUNK:
                result.add(store.upsert_history(product, granularity, chunk, f"csv:{path.name}"))
                bar.update(len(chunk))
                chunk = []
        if chunk:
            result.add(store.upsert_history(product, granularity, chunk, f"csv:{path.name}"))
            bar.update(len(chunk))
    log.info("csv imported", extra={"file": str(path), "product": product, **asdict(result)})
    return result


def missing_span(
    have: Sequence[int], open_bucket: int, count: int, granularity: int
) -> tuple[int, int] | None:
    """The span [first, last + granularity) of the ``count`` closed buckets before ``open_bucket``
    that are not in ``have`` (bucket starts), or None when they are all there."""
    needed = set(range(open_bucket - count * granularity, open_bucket, granularity))
    holes = needed - set(have)
    return (min(holes), max(holes) + granularity) if holes else None


def candles_needed(horizons: Sequence[int], history_days: int) -> dict[int, int]:
    """Per horizon, the closed candles kept whole: the models' window, and hourly at least the days asked."""
    return {g: max(WINDOW, history_days * 24) if g == HOUR else WINDOW for g in horizons}


class HistoryKeeper:
    """Keeps the candles the models need whole: back-fills holes from REST candles as candles close.

    Covers a first start (no history), the candle in which ingest began (trade-built only in part) and
    long outages, at every horizon (``needs``: granularity -> how many closed candles). Measured in the
    market's own time (trades), so a replay behaves like Coinbase. Only the holes are fetched: once
    history is whole, a close's check costs one request for one candle.
    """

    def __init__(
        self,
        store: Store,
        rest: CoinbaseRest,
        products: Sequence[str],
        needs: Mapping[int, int],
        on_filled: Callable[[], None] = lambda: None,
        health: Conditions | None = None,
        keeper: StoreKeeper | None = None,
    ) -> None:
        self.store, self.rest, self.products, self.needs = store, rest, tuple(products), dict(needs)
        self.on_filled = on_filled  # told after new history arrived (e.g. to predict at once)
        self.health = health or Conditions()
        self.keeper = keeper or StoreKeeper(store, self.health)
        self._committed = asyncio.Event()
        self._checked: dict[tuple[str, int], int] = {}

    def wake(self) -> None:
        """Something was committed: look for a newly closed candle."""
        self._committed.set()

    def forget(self) -> None:
        """The store was replaced: check every product's history again."""
        self._checked.clear()
        self._committed.set()

    async def run(self) -> None:
        while True:
            self._committed.clear()
            await self._committed.wait()
            for product in self.products:
                for granularity in self.needs:
                    if not self.keeper.writable:
                        break
                    try:
                        await self.check(product, granularity)
                    except sqlite3.Error as exc:
                        self._checked.pop((product, granularity), None)  # again once the store takes writes
                        self.keeper.failed(exc)

    async def check(self, product: str, g: int) -> None:
        state = self.store.ingest_state(product)
        if state is None:
            return
        bucket = state.last_trade_time_us // US // g  # the newest trade's: those before it have closed
        if self._checked.get((product, g)) == bucket:
            return
        self._checked[product, g] = bucket
        count, subject = self.needs[g], f"{product} {g}s"
        have = [r.start for r in self.store.series_rows(product, g, last=count + 1)]
        span = missing_span(have, bucket * g, count, g)
        if span is None:
            self.health.ok("history", subject=subject)
            return
        try:
            result = await backfill(self.store, self.rest, product, g, *span, now=bucket * g, progress=False)
        except (CoinbaseRestError, ValueError) as exc:
            self.health.problem("history", "back-fill failing", subject=subject, error=str(exc),
                                missing_from=span[0], retry="when the next candle closes")  # fmt: skip
            return
        self.health.ok("history", subject=subject)
        log.info("history back-filled", extra={"product": product, "granularity": g, "candles": result.rows})
        self.on_filled()
