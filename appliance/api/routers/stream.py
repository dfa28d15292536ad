"""``WS /api/stream``: a snapshot, then every new candle and prediction (events: ``appliance.api.stream``)."""

from __future__ import annotations

import asyncio
import sqlite3

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from appliance.api.state import AppState
from appliance.api.stream import Event, candle_event, snapshot_event
from appliance.candles import HOUR

router = APIRouter(tags=["stream"])


def snapshot(state: AppState) -> list[Event]:
    """The snapshot (predictions from memory, candles from the store if it answers), then the
    candle in progress of each product."""
    products = state.settings.products
    try:
        candles = {p: state.reader.series_rows(p, HOUR, last=48) for p in products}
    except sqlite3.Error as exc:
        state.storage_trouble(exc)
        candles = {}
    predictions = [(r, state.data_age_s(p)) for p in products for r in state.latest_of(p)]
    events = [snapshot_event(predictions, candles)]
    if state.ingest is not None:
        rows = ((p, state.ingest.live_candle(p, HOUR)) for p in products)
        events += [candle_event(p, row) for p, row in rows if row is not None]
    return events


@router.websocket("/api/stream")
async def stream(ws: WebSocket) -> None:
    """A snapshot (latest predictions, recent candles), then every new candle and prediction."""
    state: AppState = ws.app.state.appliance
    await ws.accept()
    queue = state.hub.subscribe()
    # Watch the socket as well as the queue: a client that leaves (or a server shutting down)
    # must end this handler at once, not at the next event.
    incoming = asyncio.ensure_future(ws.receive())
    try:
        for first in snapshot(state):
            await ws.send_json(first)
        while True:
            event = asyncio.ensure_future(queue.get())
            await asyncio.wait({event, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if incoming.done():
                event.cancel()
                if incoming.result()["type"] == "websocket.disconnect":
                    return
                incoming = asyncio.ensure_future(ws.receive())  # clients have nothing to say: ignored
                if not event.cancelled() and event.done():
                    await ws.send_json(event.result())
                continue
            await ws.send_json(event.result())
    except WebSocketDisconnect:
        pass
    finally:
        incoming.cancel()
        state.hub.unsubscribe(queue)
