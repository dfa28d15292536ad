"""The HTTP app: composes the routers, the static files and request timing; nothing else lives here."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__
from appliance.api.errors import storage_unavailable
from appliance.api.routers import accuracy, candles, health, predictions, site, stream
from appliance.api.routers.site import STATIC
from appliance.api.state import AppState
from appliance.metrics import HTTP_LATENCY


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(
        title="cryptopi",
        version=__version__,
        description="Next-candle BTC-USD / ETH-USD predictions from a Raspberry Pi.",
        # Prometheus at /metrics is the appliance's telemetry; FastAPI's OpenTelemetry hooks would only
        # cost every request a few provider look-ups.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.appliance = state
    for module in (health, predictions, candles, accuracy, stream, site):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Timed)
    app.add_exception_handler(sqlite3.Error, storage_unavailable)
    return app


class Timed:
    """Request latency by route, as plain ASGI (Starlette's BaseHTTPMiddleware costs far more)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.by_route: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            histogram = self.by_route.get(route)
            if histogram is None:
                histogram = self.by_route[route] = HTTP_LATENCY.labels(route)
            histogram.observe(time.perf_counter() - started)
