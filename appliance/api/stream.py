"""The live stream's events and their fan-out to WebSocket clients, built here and only here.

Each client has a small queue; a client too slow to keep up loses its oldest events, never slows
the appliance down. Events are plain JSON-able dicts: ``{"type": "snapshot" | "candle" | "prediction"}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
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


def candle_event(product: str, row: CandleRow) -> Event:
    return {"type": "candle", "product": product, "candle": CandleOut.of(row).model_dump(mode="json")}


def prediction_event(row: PredictionRow) -> Event:
    return {"type": "prediction", "prediction": PredictionResult.of(row, 0.8, None).model_dump(mode="json")}


def snapshot_event(
    predictions: Sequence[tuple[PredictionRow, float | None]], candles: Mapping[str, Sequence[CandleRow]]
) -> Event:
    """What a new client starts from: each latest prediction (with its data age) and recent candles."""
    return {
        "type": "snapshot",
        "predictions": [PredictionResult.of(r, 0.8, age).model_dump(mode="json") for r, age in predictions],
        "candles": {
            p: [CandleOut.of(r).model_dump(mode="json") for r in rows] for p, rows in candles.items()
        },
    }


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
                self.hub.publish(candle_event(product, row))

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            self.hub.publish(prediction_event(r))
