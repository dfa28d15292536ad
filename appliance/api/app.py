"""The HTTP app: composes the routers, the static files, the docs, the edge rules and request timing."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__
from appliance.api.edge import Edge
from appliance.api.errors import storage_unavailable, validation_error
from appliance.api.routers import accuracy, candles, health, predictions, site, stream
from appliance.api.routers.site import STATIC
from appliance.api.state import AppState
from appliance.metrics import HTTP_LATENCY


def create_app(state: AppState) -> FastAPI:
    settings = state.settings
    app = FastAPIOffline(  # /docs and /redoc from the package's own Swagger UI and ReDoc: no CDN
        static_url="/docs/assets",  # under /docs: local-only with it (appliance.api.edge)
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask an online validator
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
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(sqlite3.Error, storage_unavailable)
    app.add_middleware(Timed)
    # Outermost: a refusal costs nothing more.
    app.add_middleware(Edge, local_networks=settings.http_local_networks, rate_per_s=settings.http_rate_per_s,
                       burst=settings.http_rate_burst,
                       streams_per_client=settings.http_streams_per_client)  # fmt: skip
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
