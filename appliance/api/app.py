"""Routes. The state they read is injected (``AppState``), so tests build it from real parts."""

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import (
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__
from appliance.api.schemas import (
    AccuracyOut,
    CandleOut,
    ErrorOut,
    Health,
    Interval,
    PredictionResult,
    PredictQuery,
    ProductHealth,
    query_parameters,
)
from appliance.api.stream import Hub
from appliance.candles import COINBASE_GRANULARITIES, parse_time
from appliance.coinbase.messages import PRODUCT_PATTERN
from appliance.inference import Inference
from appliance.ingest import Ingester
from appliance.metrics import HTTP_LATENCY
from appliance.monitoring import scores
from appliance.predictor import Predictor
from appliance.settings import Settings
from appliance.store import CandleRow, PredictionRow, Store

MAX_CANDLES = 1000
STATIC = FsPath(__file__).parent / "static"
ERRORS = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@dataclass
class AppState:
    settings: Settings
    reader: Store
    inference: Inference
    predictor: Predictor
    ingester: Ingester | None = None
    hub: Hub = field(default_factory=Hub)
    #: The newest prediction per (product, model), kept as it is made: reading it costs nothing.
    latest: dict[tuple[str, str], PredictionRow] = field(default_factory=dict)

    def keep(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            if r.as_of >= getattr(self.latest.get((r.product, r.model)), "as_of", 0):
                self.latest[r.product, r.model] = r

    def data_age_s(self, product: str) -> float | None:
        cursor = self.ingester.cursors.get(product) if self.ingester else None
        last_us = cursor.last_time_us if cursor else None
        if not last_us:
            state = self.reader.ingest_state(product)
            last_us = state.last_trade_time_us if state else None
        return round(time.time() - last_us / 1e6, 3) if last_us else None


ProductPath = Annotated[str, Path(pattern=PRODUCT_PATTERN, examples=["BTC-USD"])]


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(
        title="cryptopi",
        version=__version__,
        description="Next-candle BTC-USD / ETH-USD predictions from a Raspberry Pi.",
        # Prometheus at /metrics is the appliance's telemetry; FastAPI's OpenTelemetry hooks would only
        # cost every request a few provider look-ups.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )

    def known(product: str) -> str:
        if product not in state.settings.products:
            served = ", ".join(state.settings.products)
            raise HTTPException(404, f"unknown product {product}; this appliance serves {served}")
        return product

    def known_model(product: str, model: str) -> None:
        names = state.inference.models_of(product)
        if model not in names:
            raise HTTPException(
                404, f"no model {model} for {product}; models: {', '.join(names) or 'none loaded'}"
            )

    @app.get("/livez")
    async def livez() -> dict[str, bool]:
        """The process answers (for container health checks and as the benchmark's trivial endpoint)."""
        return {"alive": True}

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        products = {}
        for product in state.settings.products:
            loaded = state.inference.serving_of(product)
            missing = state.predictor.missing.get(product)
            products[product] = ProductHealth(
                data_age_s=state.data_age_s(product),
                model_version=loaded.manifest.version if loaded else None,
                models=state.inference.models_of(product),
                prediction=missing or "ok",
            )
        connected = bool(state.ingester and state.ingester.feed.connected)
        ok = connected and all(p.prediction == "ok" for p in products.values())
        return Health(status="ok" if ok else "degraded", version=__version__, build=state.settings.build,
                      ingest_connected=connected, products=products)  # fmt: skip

    @app.get(
        "/api/predict",
        response_model=PredictionResult,
        responses=ERRORS,  # type: ignore[arg-type]
        openapi_extra={"parameters": query_parameters(PredictQuery)},
    )
    async def predict(request: Request) -> Response:
        """The newest kept prediction, or the one in force at ``at``.

        The hot path of the appliance: the query is validated in one pydantic call (FastAPI's
        per-parameter machinery costs more than everything else here) and the body is rendered once
        per prediction; only ``data_age_s`` is written per request.
        """
        try:
            query = PredictQuery.model_validate(request.query_params)
        except ValidationError as exc:
            raise HTTPException(422, validation_message(exc)) from None
        product, model, at, level = query.product, query.model, query.at, query.level
        known(product)
        if level not in (0.8, 0.95):
            raise HTTPException(422, f"level must be 0.8 or 0.95, not {level}")
        when = None
        if at is not None and at != "now":
            try:
                when = parse_time(at)
            except ValueError as exc:
                raise HTTPException(422, f"at: {exc}") from None
        known_model(product, model)
        kept = state.latest.get((product, model)) if when is None else None
        rows = [kept] if kept else state.reader.predictions(product, model=model, at=when, limit=1)
        if not rows:
            if when is not None:
                raise HTTPException(404, f"no {product} {model} prediction at or before {at}")
            raise HTTPException(503, f"no {product} prediction yet: {state.predictor.missing.get(product)}")
        age = state.data_age_s(product)
        body = rendered(rows[0], level) + (b"null}" if age is None else f"{age}}}".encode())
        return Response(body, media_type="application/json")

    @app.get("/api/predictions/{product}", response_model=list[PredictionResult], responses=ERRORS)  # type: ignore[arg-type]
    async def predictions(product: ProductPath) -> list[PredictionResult]:
        known(product)
        age = state.data_age_s(product)
        return [result(r, 0.8, age) for r in state.reader.latest_predictions(product)]

    @app.get("/api/candles/{product}", response_model=list[CandleOut], responses=ERRORS)  # type: ignore[arg-type]
    async def candles(
        product: ProductPath,
        granularity: Annotated[int, Query(description=f"One of {COINBASE_GRANULARITIES}")] = 3600,
        start: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
        end: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
    ) -> list[CandleOut]:
        known(product)
        if granularity not in COINBASE_GRANULARITIES:
            raise HTTPException(
                422, f"granularity must be one of {COINBASE_GRANULARITIES}, not {granularity}"
            )
        bounds = {}
        for name, value in (("start", start), ("end", end)):
            if value is not None:
                try:
                    bounds[name] = parse_time(value)
                except ValueError as exc:
                    raise HTTPException(422, f"{name}: {exc}") from None
        rows = state.reader.series_rows(product, granularity, last=None if bounds else 48)
        lo, hi = bounds.get("start", -(2**62)), bounds.get("end", 2**62)
        picked = [r for r in rows if lo <= r.start < hi][-MAX_CANDLES:]
        return [candle_out(r) for r in picked]

    @app.get("/api/accuracy/{product}", response_model=list[AccuracyOut], responses=ERRORS)  # type: ignore[arg-type]
    async def accuracy(
        product: ProductPath,
        model: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,32}$")] = None,
        window: Annotated[int, Query(ge=1, le=10_000, description="Newest predictions scored")] = 168,
    ) -> list[AccuracyOut]:
        known(product)
        if model is not None:
            known_model(product, model)
        models = [model] if model is not None else state.inference.models_of(product)
        return [AccuracyOut(**vars(a)) for a in scores(state.reader, product, models, window)]

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.websocket("/api/stream")
    async def stream(ws: WebSocket) -> None:
        """A snapshot (latest predictions, recent candles), then every new candle and prediction."""
        await ws.accept()
        queue = state.hub.subscribe()
        # Watch the socket as well as the queue: a client that leaves (or a server shutting down)
        # must end this handler at once, not at the next event.
        incoming = asyncio.ensure_future(ws.receive())
        try:
            await ws.send_json(snapshot(state))
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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Timed)
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


def candle_out(r: CandleRow) -> CandleOut:
    return CandleOut(time=datetime.fromtimestamp(r.start, UTC), open=r.open, high=r.high, low=r.low,
                     close=r.close, volume=r.volume)  # fmt: skip


def snapshot(s: AppState) -> dict[str, Any]:
    predictions = [
        result(r, 0.8, s.data_age_s(p)) for p in s.settings.products for r in s.reader.latest_predictions(p)
    ]
    return {
        "type": "snapshot",
        "predictions": [p.model_dump(mode="json") for p in predictions],
        "candles": {p: [candle_out(r).model_dump(mode="json") for r in s.reader.series_rows(p, 3600, last=48)]
                    for p in s.settings.products},
    }  # fmt: skip


@lru_cache(maxsize=64)
def rendered(row: PredictionRow, level: float) -> bytes:
    """A prediction's JSON up to its last field, ``data_age_s``, which changes with every request."""
    body = result(row, level, None).model_dump_json(exclude={"data_age_s"})
    return f'{body[:-1]},"data_age_s":'.encode()


def validation_message(exc: ValidationError) -> str:
    """'field: what is wrong' for the first error, so a client sees which parameter to fix."""
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'query'}: {error['msg']}"


def result(row: PredictionRow, level: float, data_age_s: float | None) -> PredictionResult:
    lower, upper = (row.lower_80, row.upper_80) if level == 0.8 else (row.lower_95, row.upper_95)
    return PredictionResult(
        product=row.product, model=row.model, model_version=row.model_version, granularity=row.granularity,
        as_of=datetime.fromtimestamp(row.as_of, UTC),
        target_time=datetime.fromtimestamp(row.target_time, UTC),
        predicted_close=row.predicted_close, interval=Interval(lower=lower, upper=upper, level=level),
        last_close=row.last_close, data_age_s=data_age_s, realized_close=row.realized_close,
    )  # fmt: skip
