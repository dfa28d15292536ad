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
from typing import Any, Protocol

from appliance.api.schemas import CandleOut, PredictionResult
from appliance.candles import HOUR, CandleRow
from appliance.predictions import PredictionRow

QUEUE = 64
CANDLE_EVENT_GAP_S = 0.25  # live price updates to the dashboard at most 4 times a second
Event = dict[str, Any]


class IngestView(Protocol):
    """What the API and the stream see of ingest: never its internals."""

    @property
    def connected(self) -> bool: ...

    def last_trade_time_us(self, product: str) -> int | None: ...

    def live_candle(self, product: str, granularity: int) -> CandleRow | None: ...


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
    """Turns the appliance's happenings into stream events: trades (the live price) and predictions.

    The candle in progress comes from ingest's memory (it is stored only every few minutes), at
    most every ``CANDLE_EVENT_GAP_S``; the last price of a burst is sent when the gap is over.
    """

    def __init__(
        self, hub: Hub, ingest: IngestView, products: Sequence[str], granularities: Sequence[int] = (HOUR,)
    ) -> None:
        self.hub, self.ingest, self.products = hub, ingest, tuple(products)
        self.granularities = tuple(granularities)  # a candle event per product and horizon
        self._last_candle_event = 0.0
        self._due: asyncio.TimerHandle | None = None
        self._sent: dict[tuple[str, int], CandleRow] = {}

    def on_trades(self) -> None:
        if not self.hub.clients or self._due is not None:
            return
        wait = self._last_candle_event + CANDLE_EVENT_GAP_S - time.monotonic()
        if wait <= 0:
            self._publish_candles()
        else:
            self._due = asyncio.get_running_loop().call_later(wait, self._publish_candles)

    def _publish_candles(self) -> None:
        self._due = None
        self._last_candle_event = time.monotonic()
        for product in self.products:
            for g in self.granularities:
                row = self.ingest.live_candle(product, g)
                if row is not None and row != self._sent.get((product, g)):
                    self._sent[product, g] = row
                    self.hub.publish(candle_event(product, g, row))

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            self.hub.publish(prediction_event(r))
