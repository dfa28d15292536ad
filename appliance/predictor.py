"""Closed candles in, stored predictions out; closed targets in, realized closes recorded.

Woken by the ingester after each commit, so a prediction exists moments after its candle closes and
reading it later costs a lookup. New model versions are picked up between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from appliance.features import WINDOW, CandleSeries, MissingHistory
from appliance.inference import Inference
from appliance.metrics import COVERAGE_80, REALIZED_MAE
from appliance.predictions import Accuracy, PredictionRow, accuracy
from appliance.store import Store

log = logging.getLogger(__name__)
RELOAD_EVERY_S = 10.0
ACCURACY_WINDOW = 168  # predictions: a week of hours


class Predictor:
    def __init__(self, store: Store, inference: Inference, granularity: int = 3600) -> None:
        self.store = store
        self.inference = inference
        self.granularity = granularity
        self.wake = asyncio.Event()
        #: Why a product has no fresh prediction (shown by /health and in 503s), None when it has one.
        self.missing: dict[str, str | None] = dict.fromkeys(inference.products, "no candle has closed yet")
        self.listeners: list[Callable[[list[PredictionRow]], None]] = []
        self._done_as_of: dict[str, int] = {}
        #: Latest rolling accuracy per (product, model), for whoever publishes predictions.
        self.accuracy: dict[tuple[str, str], dict[str, float | None]] = {}

    def step(self) -> list[PredictionRow]:
        """Predict every product whose newest closed candle has no prediction yet."""
        made: list[PredictionRow] = []
        g = self.granularity
        for product in self.inference.products:
            rows = self.store.series_rows(product, g, last=WINDOW + 2)
            if not rows:
                self.missing[product] = "no candles stored yet"
                continue
            if self.store.realize(product, g, {r.start: r.close for r in rows[-2:]}):
                self.score(product)
            as_of = rows[-1].start + g
            if self._done_as_of.get(product) == as_of:
                continue
            if product not in self.inference.serving:
                self.missing[product] = "no model loaded"
                continue
            try:
                predictions = self.inference.predict(product, CandleSeries.from_rows(g, rows))
            except MissingHistory as exc:
                self.missing[product] = f"history too short: {exc}"
                continue
            self.store.save_predictions(predictions)
            self._done_as_of[product] = as_of
            self.missing[product] = None
            made += predictions
        if made:
            for listener in self.listeners:
                listener(made)
        return made

    def score(self, product: str) -> None:
        """Refresh the rolling accuracy (a week of hours) after new closes came in."""
        scored = scores(self.store, product, self.inference.models_of(product), ACCURACY_WINDOW)
        for a in scored:
            if a.mae is not None:
                REALIZED_MAE.labels(product, a.model).set(a.mae)
                REALIZED_MAE.labels(product, "persistence").set(a.persistence_mae or 0.0)
                COVERAGE_80.labels(product, a.model).set(a.coverage_80 or 0.0)
            self.accuracy[product, a.model] = {"mae": a.mae, "persistence_mae": a.persistence_mae,
                                               "skill": a.skill, "coverage_80": a.coverage_80}  # fmt: skip

    async def run(self) -> None:
        last_reload = time.monotonic()
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # arrives as the wake fires (a commit during shutdown), and the appliance never stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.wake.wait()
            self.wake.clear()
            if time.monotonic() - last_reload >= RELOAD_EVERY_S:
                self.inference.reload()
                last_reload = time.monotonic()
            self.step()


def scores(store: Store, product: str, models: Sequence[str], window: int) -> list[Accuracy]:
    """Each model's accuracy over its newest ``window`` predictions."""
    return [accuracy(m, store.predictions(product, model=m, limit=window)) for m in models]
