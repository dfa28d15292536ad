"""The live stream's events and their fan-out to WebSocket clients, built here and only here.

Each client has a small queue; a client too slow to keep up loses its oldest events, never slows
the appliance down. Events are plain JSON-able dicts: ``{"type": "snapshot" | "candle" | "prediction"}``,
each carrying the ``granularity`` of its candles, so a client draws one chart per product and horizon.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.api.schemas import CandleOut, PredictionResult
from appliance.candles import HOUR, CandleRow
from appliance.predictions import PredictionRow
from appliance.store import Store

QUEUE = 64
CANDLE_EVENT_GAP_S = 0.25  # live price updates to the dashboard at most 4 times a second
Event = dict[str, Any]


class Hub:
    def __init__(self) -> None:
        self._clients: set[asyncio.Queue[Event]] = set()

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._clients.discard(queue)

    def publish(self, event: Event) -> None:
        for queue in self._clients:
            if queue.full():
                queue.get_nowait()  # drop this slow client's oldest event
            queue.put_nowait(event)

    @property
    def clients(self) -> int:
        return len(self._clients)


def candle_event(product: str, granularity: int, row: CandleRow) -> Event:
    return {"type": "candle", "product": product, "granularity": granularity,
            "candle": CandleOut.of(row).model_dump(mode="json")}  # fmt: skip


def prediction_event(row: PredictionRow) -> Event:
    return {"type": "prediction", "prediction": PredictionResult.of(row, 0.8, None).model_dump(mode="json")}


@dataclass(frozen=True, slots=True)
class Series:
    """One product at one horizon: its recent closed candles and the predictions made over them."""

    product: str
    granularity: int
    candles: Sequence[CandleRow]  # oldest first
    predictions: Sequence[PredictionRow]  # every model's, oldest first; the newest may be still open
    data_age_s: float | None


def snapshot_event(series: Sequence[Series]) -> Event:
    """What a new client starts from: per product and horizon, the recent past and what was predicted."""
    return {
        "type": "snapshot",
        "series": [{
            "product": s.product, "granularity": s.granularity, "data_age_s": s.data_age_s,
            "candles": [CandleOut.of(r).model_dump(mode="json") for r in s.candles],
            "predictions": [PredictionResult.of(r, 0.8, None).model_dump(mode="json") for r in s.predictions],
        } for s in series],
    }  # fmt: skip


class LiveEvents:
    """Turns the appliance's happenings into stream events: commits (the live price) and predictions."""

    def __init__(self, hub: Hub, store: Store, products: Sequence[str]) -> None:
        self.hub, self.store, self.products = hub, store, tuple(products)
        self._last_candle_event = 0.0

    def on_commit(self) -> None:
        """The candle in progress of each product, at most every ``CANDLE_EVENT_GAP_S``."""
        if not self.hub.clients or time.monotonic() - self._last_candle_event < CANDLE_EVENT_GAP_S:
            return
        self._last_candle_event = time.monotonic()
        for product in self.products:
            row = self.store.newest_trade_candle(product, HOUR)
            if row is not None:
                self.hub.publish(candle_event(product, HOUR, row))

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            self.hub.publish(prediction_event(r))
