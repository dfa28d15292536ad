"""``python -m appliance up``: ingest, prediction and the HTTP API in one process, one event loop.

The ingester is the only writer to SQLite (the predictor writes through the same connection, on the
same loop); the API reads through its own read-only connection, so a slow client never holds up a
commit. If Coinbase is unreachable the API keeps serving what is stored and /health says so.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import uvicorn

from appliance.api.app import AppState, candle_out, create_app, result
from appliance.api.stream import Hub
from appliance.backfill import backfill
from appliance.candles import US, bucket_start
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.features import WINDOW
from appliance.inference import Inference
from appliance.ingest import Ingester
from appliance.mqtt import MqttPublisher
from appliance.predictor import Predictor
from appliance.settings import Settings
from appliance.store import PredictionRow, Store

log = logging.getLogger(__name__)
HOUR = 3600
CANDLE_EVENT_GAP_S = 0.25  # live price updates to the dashboard at most 4 times a second


def live_candles(store: Store, products: tuple[str, ...]) -> list[dict[str, Any]]:
    """The candle in progress of each product (the dashboard's live price), as stream events."""
    events = []
    for product in products:
        state = store.ingest_state(product)
        if state is None:
            continue
        rows = store.candles(
            product, HOUR, source="trades", start=bucket_start(state.last_trade_time_us, HOUR)
        )
        if rows:
            events.append(
                {"type": "candle", "product": product, "candle": candle_out(rows[-1]).model_dump(mode="json")}
            )
    return events


def missing_hours(store: Store, product: str, open_hour: int, hours: int) -> tuple[int, int] | None:
    """The span of the ``hours`` closed hours before ``open_hour`` that the store lacks, if any."""
    needed = set(range(open_hour - hours * HOUR, open_hour, HOUR))
    have = {r.start for r in store.series_rows(product, HOUR, last=hours + 1)}
    holes = needed - have
    return (min(holes), max(holes) + HOUR) if holes else None


async def keep_history(
    settings: Settings, store: Store, rest: CoinbaseRest, predictor: Predictor, committed: asyncio.Event
) -> None:
    """Keep the hours the models need whole: back-fill holes from REST candles as hours close.

    Covers a first start (no history), the hour in which ingest began (trade-built only in part)
    and long outages. Measured in the market's own time (trades), so a replay behaves like Coinbase.
    """
    checked: dict[str, int] = {}
    while True:
        committed.clear()
        await committed.wait()
        for product in settings.products:
            state = store.ingest_state(product)
            if state is None or checked.get(product) == (hour := state.last_trade_time_us // US // HOUR):
                continue
            checked[product] = hour
            # Only the holes: once history is whole, an hour's check costs one request for one candle.
            span = missing_hours(store, product, hour * HOUR, max(WINDOW, settings.history_days * 24))
            if span is None:
                continue
            try:
                result = await backfill(store, rest, product, HOUR, *span, now=hour * HOUR, progress=False)
            except (CoinbaseRestError, ValueError) as exc:
                log.error("history back-fill failed; will retry next hour",
                          extra={"product": product, "error": str(exc)})  # fmt: skip
                continue
            log.info("history back-filled", extra={"product": product, "candles": result.rows})
            predictor.wake.set()


async def up(settings: Settings) -> None:
    store = Store(settings.db_path)
    reader = Store(settings.db_path, readonly=True)
    inference = Inference(settings.models_dir, settings.products)
    inference.reload()
    predictor = Predictor(store, inference)
    publisher = None
    if settings.mqtt_url:
        publisher = MqttPublisher(
            settings.mqtt_url, settings.mqtt_device_id, settings.products,
            discovery_prefix=settings.mqtt_discovery_prefix, ca_file=settings.mqtt_ca_file,
            configuration_url=settings.dashboard_url,
        )  # fmt: skip

        def to_mqtt(rows: list[PredictionRow]) -> None:
            assert publisher is not None
            for product, granularity in {(r.product, r.granularity) for r in rows}:
                publisher.set_models(product, granularity, inference.models_of(product))
            publisher.publish(rows, predictor.accuracy)

        predictor.listeners.append(to_mqtt)
        for product in settings.products:
            predictor.score(product)
            to_mqtt(store.latest_predictions(product))  # what is known already, before the next close
        for event in live_candles(store, settings.products):  # and the newest price stored
            publisher.publish_live_price(event["product"], event["candle"]["close"])
        publisher.start()
    async with CoinbaseRest(settings.coinbase_rest_url, rate_per_s=settings.rest_rate_per_s,
                            timeout_s=settings.rest_timeout_s) as rest:  # fmt: skip
        committed = asyncio.Event()
        hub = Hub()
        last_candle_event = 0.0

        def on_commit() -> None:
            nonlocal last_candle_event
            predictor.wake.set()
            committed.set()
            if publisher:  # the publisher keeps the pace (and skips what did not change)
                for product, cursor in ingester.cursors.items():
                    if cursor.last_price is not None:
                        publisher.publish_live_price(product, cursor.last_price)
            if hub.clients and time.monotonic() - last_candle_event >= CANDLE_EVENT_GAP_S:
                last_candle_event = time.monotonic()
                for event in live_candles(store, settings.products):
                    hub.publish(event)

        ingester = Ingester(settings, store, rest, on_commit=on_commit,
                            on_feed=publisher.set_feed_connected if publisher else None)  # fmt: skip

        def to_stream(rows: list[PredictionRow]) -> None:
            for r in rows:
                hub.publish(
                    {"type": "prediction", "prediction": result(r, 0.8, None).model_dump(mode="json")}
                )

        predictor.listeners.append(to_stream)
        app_state = AppState(settings, reader, inference, predictor, ingester, hub)
        for product in settings.products:
            app_state.keep(store.latest_predictions(product))
        predictor.listeners.append(app_state.keep)
        app = create_app(app_state)
        # Everything loaded so far (models, libraries, the app) lives as long as the process: out of
        # the collector's sight, a full collection takes a few ms instead of tens, mid-request.
        gc.freeze()
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.http_host, port=settings.http_port, log_config=None, access_log=False,
            lifespan="off", proxy_headers=False,  # nothing here reads the client address
        ))  # fmt: skip
        # uvicorn takes SIGINT/SIGTERM while serving, shuts down, then re-raises them: the server
        # finishing is what stops every other part.
        parts = (server.serve(), ingester.run(), predictor.run(),
                 keep_history(settings, store, rest, predictor, committed))  # fmt: skip
        tasks = [asyncio.create_task(part) for part in parts]
        log.info("appliance up", extra={"http": f"{settings.http_host}:{settings.http_port}",
                                        "products": ",".join(settings.products)})  # fmt: skip
        try:
            done, _ = await asyncio.wait(tasks[:3], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a crashed part ends the process with its error
        finally:
            server.should_exit = True
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if publisher:
                publisher.stop()
            store.close()
            reader.close()
            log.info("appliance stopped")
