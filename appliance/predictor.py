"""Closed candles in, stored predictions out; closed targets in, realized closes recorded.

Woken by the ingester after each commit, so a prediction exists moments after its candle closes and
reading it later costs a lookup. A step looks only at the products whose market clock (their newest
committed trade) entered a new candle, or that still wait for one (history being back-filled, no
models yet), so fifty products cost little more than two between closes. New model versions are
picked up between steps. While the store cannot be written, nothing is predicted (no new candle can
have been stored either); the step after it works again catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from appliance.candles import US, CandleRow
from appliance.features import WINDOW, CandleSeries, MissingHistory
from appliance.inference import Inference
from appliance.metrics import COVERAGE_80, REALIZED_MAE
from appliance.predictions import Accuracy, PredictionRow
from appliance.store import Store
from appliance.storekeeper import StoreKeeper, reported

log = logging.getLogger(__name__)
RELOAD_EVERY_S = 10.0
RETRY_S = 1.0  # a product waiting for its newest closed candle is looked at again at most this often
ACCURACY_WINDOW = 168  # predictions: a week of hours
LOGGED_PER_ROUND = 12  # predicted closes named in a round's log line


Horizon = tuple[str, int]  # (product, granularity)


class Predictor:
    """Predicts each product at each horizon its models serve (``Inference.granularities``)."""

    def __init__(self, store: Store, inference: Inference, keeper: StoreKeeper | None = None) -> None:
        self.store = store
        self.keeper = keeper
        self.inference = inference
        self.wake = asyncio.Event()
        #: Why a product has no fresh prediction at a horizon (shown by /health and in 503s), None when
        #: it has one.
        self.missing: dict[Horizon, str | None] = {
            (p, g): "no candle has closed yet" for p in inference.products for g in inference.granularities
        }
        self.listeners: list[Callable[[list[PredictionRow]], None]] = []
        self._done_as_of: dict[Horizon, int] = {}
        self._looked: dict[Horizon, tuple[int | None, float]] = {}  # the open candle seen, and when
        self._waiting: set[Horizon] = set()  # its newest closed candle not predicted yet
        #: Latest rolling accuracy per (product, granularity, model), for whoever publishes predictions.
        self.accuracy: dict[tuple[str, int, str], dict[str, float | None]] = {}

    def why_not(self, product: str) -> str | None:
        """Why ``product`` lacks a fresh prediction at some horizon (each named), None when it has all."""
        reasons = [f"{g}s: {why}" for (p, g), why in sorted(self.missing.items()) if p == product and why]
        return "; ".join(reasons) or None

    def refresh(self) -> None:
        """Look at every product again at the next step (new history arrived), and wake."""
        self._looked.clear()
        self.wake.set()

    def step(self) -> list[PredictionRow]:
        """Predict every product and horizon whose newest closed candle has no prediction yet."""
        if self.keeper is not None and not self.keeper.writable:
            return []
        with reported(self.keeper):
            return self._step()
        return []

    def forget(self) -> None:
        """The store was replaced: every candle is new to it, predicted or not."""
        self._done_as_of.clear()
        self._looked.clear()

    def _step(self) -> list[PredictionRow]:
        """One round over the pairs due: read their windows, record the closes that came due (one
        transaction) and score them, predict, and store the round's predictions (one transaction).
        Two commits a round rather than two a pair: fifty products close together."""
        started = time.perf_counter()
        windows = self._due_windows()
        if not windows:
            return []
        closes = {key: {r.start: r.close for r in rows[-2:]} for key, (_, rows) in windows.items()}
        for key, realized in self.store.realize(closes).items():
            if realized:
                self.score(*key)
        made = {key: self._made(key, rows) for key, (_, rows) in windows.items()
                if self._done_as_of.get(key) != rows[-1].start + key[1]}  # fmt: skip
        rows_made = [p for predictions in made.values() for p in predictions]
        if rows_made:
            self.store.save_predictions(rows_made)
        for key, predictions in made.items():
            if predictions:
                self._done_as_of[key] = predictions[0].as_of
                self.missing[key] = None
        for key, (open_bucket, rows) in windows.items():
            as_of = rows[-1].start + key[1]
            if self._done_as_of.get(key) == as_of and open_bucket in (as_of, None):  # none newer can come yet
                self._waiting.discard(key)
            else:  # looked at again within RETRY_S until the candle before open_bucket is predicted
                self._waiting.add(key)
        if rows_made:
            log.info("predictions made", extra=round_fields(rows_made, time.perf_counter() - started))
            for listener in self.listeners:
                listener(rows_made)
        return rows_made

    def _due_windows(self) -> dict[Horizon, tuple[int | None, list[CandleRow]]]:
        """The open candle and the newest closed candles of each pair whose market clock entered a new
        candle, or that still waits for one (at most every ``RETRY_S``)."""
        clock, now = self.store.last_trade_times(), time.monotonic()
        windows = {}
        for product in self.inference.products:
            for g in self.inference.granularities:
                key = (product, g)
                open_bucket = clock[product] // US // g * g if product in clock else None
                seen = self._looked.get(key)
                if seen and seen[0] == open_bucket and (key not in self._waiting or now - seen[1] < RETRY_S):
                    continue
                self._looked[key] = (open_bucket, now)
                rows = self.store.series_rows(product, g, last=WINDOW + 2)
                if rows:
                    windows[key] = (open_bucket, rows)
                else:
                    self.missing[key] = "no candles stored yet"
                    self._waiting.add(key)
        return windows

    def _made(self, key: Horizon, rows: list[CandleRow]) -> list[PredictionRow]:
        """The predictions from the newest closed candle of ``rows``; none (and why) if it cannot be."""
        product, g = key
        if self.inference.serving_of(product, g) is None:
            self.missing[key] = "no model loaded"
            return []
        try:
            return self.inference.predict(product, CandleSeries.from_rows(g, rows))
        except MissingHistory as exc:
            self.missing[key] = f"history too short: {exc}"
            return []

    def score(self, product: str, granularity: int) -> None:
        """Refresh the rolling accuracy (the newest week of hours, or of 15 minutes) after new closes."""
        models = self.inference.models_of(product, granularity)
        for a in scores(self.store, product, models, ACCURACY_WINDOW, granularity):
            if a.mae is not None:
                REALIZED_MAE.labels(product, str(granularity), a.model).set(a.mae)
                COVERAGE_80.labels(product, str(granularity), a.model).set(a.coverage_80 or 0.0)
            self.accuracy[product, granularity, a.model] = {
                "mae": a.mae, "persistence_mae": a.persistence_mae, "skill": a.skill,
                "coverage_80": a.coverage_80, "predictions": a.predictions,
            }  # fmt: skip

    async def run(self) -> None:
        """Step when woken (a commit) or when new models came in; otherwise sleep."""
        last_reload = time.monotonic()
        self.step()  # a candle that closed while the appliance was down
        while True:
            # asyncio.timeout, not wait_for: on 3.11, wait_for loses a cancellation that arrives as the
            # event is set (the ingester sets it on every commit), and the appliance would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_EVERY_S):
                    await self.wake.wait()
            woken = self.wake.is_set()
            self.wake.clear()
            reloaded = False
            if time.monotonic() - last_reload >= RELOAD_EVERY_S:
                # In a worker thread: checking a new version hashes and loads its files, which must
                # never stall the API or ingest (the swap itself is one assignment).
                reloaded = await asyncio.to_thread(self.inference.reload)
                if reloaded:
                    self._looked.clear()
                last_reload = time.monotonic()
            if woken or reloaded:
                self.step()


def round_fields(rows: Sequence[PredictionRow], seconds: float) -> dict[str, object]:
    """The log fields of one prediction round: when, how long, and every model's predicted close."""
    as_of = max(r.as_of for r in rows)
    shown = rows[:LOGGED_PER_ROUND]  # fifty products' predictions would make a line no one reads
    return {
        "as_of": datetime.fromtimestamp(as_of, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "predictions": len(rows), "products": len({r.product for r in rows}), "ms": round(seconds * 1000, 1),
        **{f"{r.product}.{r.granularity}.{r.model}": round(r.predicted_close, 2) for r in shown},
    } | ({"more": len(rows) - len(shown)} if len(rows) > len(shown) else {})  # fmt: skip


def scores(
    store: Store, product: str, models: Sequence[str], window: int, granularity: int
) -> list[Accuracy]:
    """Each model's accuracy over its newest ``window`` predictions at one horizon."""
    return [store.accuracy(product, granularity, m, window) for m in models]
