"""``WS /api/stream``: a snapshot, then every new candle and prediction (events: ``appliance.api.stream``)."""

from __future__ import annotations

import asyncio
import sqlite3

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from appliance.api.state import AppState
from appliance.api.stream import Event, Series, candle_event, snapshot_event

router = APIRouter(tags=["stream"])
CHART_CANDLES = 48


def snapshot(state: AppState) -> list[Event]:
    """Every product at every horizon the appliance predicts (from the store, or if it fails only the
    newest predictions, from memory), then each one's candle in progress (from ingest's memory)."""
    series, live = [], []
    for p in state.settings.products:
        age = state.data_age_s(p)
        for g in state.settings.horizons:
            try:
                candles = state.reader.series_rows(p, g, last=CHART_CANDLES)
                made = state.reader.predictions(p, granularity=g, since=candles[0].start) if candles else []
            except sqlite3.Error as exc:
                state.storage_trouble(exc)
                candles, made = [], state.latest_of(p, g)
            series.append(Series(p, g, candles, made[::-1], age))
            row = state.ingest.live_candle(p, g) if state.ingest is not None else None
            live += [candle_event(p, g, row)] if row is not None else []
    return [snapshot_event(series), *live]


async def send(ws: WebSocket, event: Event) -> None:
    try:
        await ws.send_json(event)
    except RuntimeError as exc:
        # uvicorn's answer to a send after a close it sent itself (a client message over the size
        # limit, a shutdown) that this handler has not read yet: the client is gone all the same.
        raise WebSocketDisconnect(1006) from exc


@router.websocket("/api/stream")
async def stream(ws: WebSocket) -> None:
    """A snapshot (per product and horizon: recent candles and the predictions made over them), then
    every new candle and prediction."""
    state: AppState = ws.app.state.appliance
    await ws.accept()
    queue = state.hub.subscribe()
    # Watch the socket as well as the queue: a client that leaves (or a server shutting down)
    # must end this handler at once, not at the next event.
    incoming = asyncio.ensure_future(ws.receive())
    try:
        for first in snapshot(state):
            await send(ws, first)
        while True:
            event = asyncio.ensure_future(queue.get())
            await asyncio.wait({event, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if incoming.done():
                event.cancel()
                if incoming.result()["type"] == "websocket.disconnect":
                    return
                incoming = asyncio.ensure_future(ws.receive())  # clients have nothing to say: ignored
                if not event.cancelled() and event.done():
                    await send(ws, event.result())
                continue
            await send(ws, event.result())
    except WebSocketDisconnect:
        pass
    finally:
        incoming.cancel()
        state.hub.unsubscribe(queue)
