"""``python -m appliance up``: ingest, prediction and the HTTP API in one process, one event loop.

Wiring only: who is told what. The ingester is the only writer to SQLite (the predictor and the
history keeper write through the same connection, on the same loop); the API reads through its own
read-only connection, so a slow client never holds up a commit. If Coinbase is unreachable the API
keeps serving what is stored and /health says so. If storage fails (a full disk, a read-only folder,
a corrupt file), the store keeper says so in /health and deals with it while the API, the stream
and MQTT go on serving what they hold: the process never ends over it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from functools import partial

from appliance.api.app import create_app
from appliance.api.server import http_server
from appliance.api.state import AppState
from appliance.api.stream import Hub, LiveEvents
from appliance.calibration import Calibrator
from appliance.candles import HOUR, Candle
from appliance.coinbase.rest import CoinbaseRest
from appliance.health import Conditions
from appliance.helpers.net import listen
from appliance.history import HistoryKeeper, candles_needed
from appliance.inference import Inference
from appliance.ingest import Ingester
from appliance.mqtt import MqttPublisher
from appliance.predictor import Predictor
from appliance.products import resolve_settings
from appliance.settings import Settings
from appliance.store import Store
from appliance.storekeeper import StoreKeeper

log = logging.getLogger(__name__)


async def up(settings: Settings) -> None:
    # The HTTP port first: a second appliance on the same port stops here, before it opens the store.
    http_socket = listen(settings.http_host, settings.http_port)
    health = Conditions()  # every part reports its trouble here; /health shows it
    async with CoinbaseRest.from_settings(settings, health) as rest:  # what a *-USD pattern stands for
        settings = await resolve_settings(settings, rest)
    store = Store(settings.db_path, connect=False)
    reader = Store(settings.db_path, readonly=True, connect=False)
    keeper = StoreKeeper(store, health, reader)
    keeper.open()  # trouble is reported, not raised: the API serves whatever can be read
    inference = Inference(settings.models_dir, settings.products, settings.horizons, health)
    inference.reload()
    predictor = Predictor(store, inference, keeper=keeper)
    async with CoinbaseRest.from_settings(settings, health) as rest:
        ingester = Ingester(settings, store, rest, health=health, keeper=keeper)
        needs = candles_needed(settings.horizons, settings.history_days)
        history = HistoryKeeper(store, rest, settings.products, needs, predictor.refresh, health, keeper)
        # Its own read connection: it reads weeks of candles in a worker thread.
        calibrator_reader = Store(settings.db_path, readonly=True, connect=False)
        calibrator = Calibrator(store, calibrator_reader, rest, inference, health, keeper)
        hub = Hub()
        live = LiveEvents(hub, ingester, settings.products, settings.horizons)
        ingester.listeners += [predictor.wake.set, history.wake, calibrator.wake]
        ingester.trade_listeners.append(live.on_trades)
        keeper.on_replaced += [predictor.forget, history.forget, calibrator.forget]
        app_state = AppState(settings, reader, inference, predictor, ingester, hub, health,
                             storage_error=keeper.failed)  # fmt: skip
        for product in settings.products:
            app_state.keep(keeper.read(partial(reader.latest_predictions, product), []))
        predictor.listeners += [live.on_predictions, app_state.keep]
        publisher = None
        if settings.mqtt_url:
            publisher = MqttPublisher(
                settings.mqtt_url, settings.mqtt_device_id, settings.products,
                discovery_prefix=settings.mqtt_discovery_prefix, ca_file=settings.mqtt_ca_file,
                configuration_url=settings.dashboard_url, models_of=inference.models_of,
                accuracy=predictor.accuracy, live_prices=ingester.last_prices, health=health,
            )  # fmt: skip
            predictor.listeners.append(publisher.on_predictions)
            ingester.trade_listeners.append(publisher.on_trades)  # not on commits: minutes apart
            ingester.feed_listeners.append(publisher.set_feed_connected)
            for product in settings.products:  # what is known already, before the next close
                for g in settings.horizons:
                    keeper.read(partial(predictor.score, product, g), None)
                publisher.on_predictions(keeper.read(partial(reader.latest_predictions, product), []))
                opened: dict[int, tuple[int, Candle]] = keeper.read(partial(reader.open_candles, product), {})
                if HOUR in opened:
                    publisher.publish_live_price(product, opened[HOUR][1].close)
            publisher.start()
        app = create_app(app_state)
        # Everything loaded so far (models, libraries, the app) lives as long as the process: out of
        # the collector's sight, a full collection takes a few ms instead of tens, mid-request.
        gc.freeze()
        server = http_server(app, settings)
        # uvicorn takes SIGINT/SIGTERM while serving, shuts down, then re-raises them: the server
        # finishing is what stops every other part.
        parts = (
            server.serve([http_socket]),
            ingester.run(),
            predictor.run(),
            history.run(),
            keeper.run(),
            calibrator.run(),
        )
        tasks = [asyncio.create_task(part) for part in parts]
        log.info("appliance up", extra={"http": f"{settings.http_host}:{settings.http_port}",
                                        "products": ",".join(settings.products)})  # fmt: skip
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a crashed part ends the process with its error
        finally:
            server.should_exit = True
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if publisher:
                publisher.stop()
            reader.close()
            calibrator_reader.close()
            store.close()  # the last connection: the write-ahead log is folded in, one file remains
            log.info("appliance stopped")
