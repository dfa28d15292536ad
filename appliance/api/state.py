"""What the routes read: a narrow view of the running appliance, injected (tests build it from real parts).

The API never reaches into ingest: it sees :class:`IngestView` (is the feed connected, how fresh is a
product's data, the candle in progress), which the ingester provides. Storage errors met while
answering go to ``storage_error``, which says what is wrong (and, in the appliance, sets repair going).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from appliance.api.stream import Hub, IngestView
from appliance.candles import HORIZONS, HOUR
from appliance.health import Conditions
from appliance.inference import Inference
from appliance.predictions import PredictionRow
from appliance.predictor import Predictor
from appliance.settings import Settings
from appliance.store import Store
from appliance.storekeeper import diagnose


@dataclass
class AppState:
    settings: Settings
    reader: Store
    inference: Inference
    predictor: Predictor
    ingest: IngestView | None = None
    hub: Hub = field(default_factory=Hub)
    health: Conditions = field(default_factory=Conditions)
    #: The newest prediction per (product, granularity, model), kept as made: reading it costs nothing.
    latest: dict[tuple[str, int, str], PredictionRow] = field(default_factory=dict)
    #: A storage error met while answering -> what to tell the client.
    storage_error: Callable[[BaseException], str] | None = None

    def storage_trouble(self, exc: BaseException) -> str:
        if self.storage_error is not None:
            return self.storage_error(exc)
        return diagnose(exc, self.reader.path).message

    def latest_of(self, product: str, granularity: int | None = None) -> list[PredictionRow]:
        """The newest prediction of every model of a product (at one horizon, or at each, the longest
        first), from memory: the store may be failing."""
        rows = (r for (p, g, _), r in self.latest.items() if p == product and granularity in (None, g))
        return sorted(rows, key=lambda r: (-r.granularity, r.model))

    def keep(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            key = (r.product, r.granularity, r.model)
            if r.as_of >= getattr(self.latest.get(key), "as_of", 0):
                self.latest[key] = r

    def data_age_s(self, product: str) -> float | None:
        last_us = self.ingest.last_trade_time_us(product) if self.ingest else None
        if not last_us:
            try:
                state = self.reader.ingest_state(product)
            except sqlite3.Error as exc:
                self.storage_trouble(exc)
                state = None
            last_us = state.last_trade_time_us if state else None
        return round(time.time() - last_us / 1e6, 3) if last_us else None

    def stale(self, product: str) -> str | None:
        """Why the product's data may be out of date: its own problems and an unreachable Coinbase feed."""
        reasons = [
            p.message
            for p in self.health.current()
            if p.subject == product or (p.component == "coinbase" and p.subject is None)
        ]
        return "; ".join(reasons) or None

    def known(self, product: str) -> str:
        """``product``, or a 404 naming the products served."""
        if product not in self.settings.products:
            served = ", ".join(self.settings.products)
            raise HTTPException(404, f"unknown product {product}; this appliance serves {served}")
        return product

    def known_horizon(self, granularity: int) -> int:
        """``granularity``, or a 422 (not a horizon at all) or 404 (not one this appliance predicts)."""
        if granularity not in HORIZONS:
            raise HTTPException(422, f"granularity: {' or '.join(map(str, HORIZONS))}, not {granularity}")
        if granularity not in self.settings.horizons:
            served = ", ".join(map(str, self.settings.horizons))
            raise HTTPException(404, f"granularity: this appliance predicts {served} only, not {granularity}")
        return granularity

    def known_model(self, product: str, model: str, granularity: int = HOUR) -> None:
        names = self.inference.models_of(product, granularity)
        if model not in names:
            raise HTTPException(404, f"no model {model} for {product} at {granularity}s; "
                                     f"models: {', '.join(names) or 'none loaded'}")  # fmt: skip


async def app_state(request: Request) -> AppState:
    """The dependency every route reads the appliance through (async: no worker-thread hop)."""
    state: AppState = request.app.state.appliance
    return state


State = Annotated[AppState, Depends(app_state)]
