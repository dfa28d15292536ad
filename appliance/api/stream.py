"""Fan-out of live events (new candles and predictions) to WebSocket clients.

Each client has a small queue; a client too slow to keep up loses its oldest events, never slows
the appliance down. Events are plain JSON-able dicts: ``{"type": "candle" | "prediction", ...}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

QUEUE = 64


class Hub:
    def __init__(self) -> None:
        self._clients: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._clients.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in self._clients:
            if queue.full():
                queue.get_nowait()  # drop this slow client's oldest event
            queue.put_nowait(event)

    @property
    def clients(self) -> int:
        return len(self._clients)
