"""Predictions over MQTT, with Home Assistant discovery (paho-mqtt, its own network thread).

Everything is published retained at QoS 1 under ``cryptopi/<device>/``, so a dashboard shows the last
value at once:

- ``<product>/<horizon>/<model>``: each prediction as JSON; the horizon comes from its granularity
  (``1h`` for 3600 s, ``15m`` for 900 s);
- ``<product>/price``: the live price (the newest committed trade), at most every
  ``LIVE_PRICE_GAP_S`` and only when it changed, so neither an SD-card broker nor Home Assistant's
  recorder is flooded;
- ``feed``: ``ON`` while the Coinbase feed is connected, ``OFF`` otherwise;
- ``status``: ``online`` when connected, ``offline`` by last will (or on a clean stop).

Discovery configs are sent on every connect and again whenever Home Assistant announces ``online`` on
``homeassistant/status``. They are checked against Home Assistant 2024.3.3's own schema by the suite,
and against current Home Assistant's by a mirror of it. A broker that is down never holds anything up:
paho reconnects by itself, and on each connect the latest values are published again (a restarted
broker may have lost its retained messages).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt

from appliance import __version__
from appliance.candles import quote_currency
from appliance.health import Conditions
from appliance.helpers.mqtt import HA_STATUS, came_online, go_offline, ha_device, ha_entity_id, mqtt_client
from appliance.metrics import MQTT_CONNECTED, MQTT_PUBLISHED
from appliance.predictions import PredictionRow

log = logging.getLogger(__name__)

LIVE_PRICE_GAP_S = 10.0
EXPIRE_AFTER_HORIZONS = 3  # a prediction this many horizons old reads "unavailable" in Home Assistant
ORIGIN = {"name": "cryptopi", "sw_version": __version__}
#: Realized skill in percent; ``None`` (Home Assistant: unknown) until a prediction has come due.
SKILL_TEMPLATE = (
    "{% set s = value_json.accuracy.skill | default(none) %}{{ none if s is none else (s * 100) | round(2) }}"
)


def slug(text: str) -> str:
    """Home Assistant's id alphabet: [a-zA-Z0-9_-] (topics use it too)."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_")


def horizon(granularity: int) -> tuple[str, str]:
    """A horizon as an id and in words: 3600 -> ("1h", "next hour"), 900 -> ("15m", "next 15 min")."""
    if granularity % 3600 == 0:
        hours = granularity // 3600
        return f"{hours}h", "next hour" if hours == 1 else f"next {hours} hours"
    return f"{granularity // 60}m", f"next {granularity // 60} min"


def prediction_payload(row: PredictionRow, accuracy: dict[str, float | None] | None = None) -> dict[str, Any]:
    return {
        "product": row.product, "model": row.model, "model_version": row.model_version,
        "granularity": row.granularity, "as_of": row.as_of, "target_time": row.target_time,
        "predicted_close": round(row.predicted_close, 2),
        "lower_80": round(row.lower_80, 2), "upper_80": round(row.upper_80, 2),
        "lower_95": round(row.lower_95, 2), "upper_95": round(row.upper_95, 2),
        "last_close": row.last_close, "currency": quote_currency(row.product),
        "pooled": row.calibration != "training", "calibration": row.calibration,
        "calibrated_at": row.calibrated_at, "calibration_note": row.calibration_note,
        "accuracy": accuracy or {},
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Discovery:
    """One Home Assistant discovery config and where it is published."""

    component: Literal["sensor", "binary_sensor"]
    key: str  # the topic's object id; also ends the unique id and the entity id
    config: dict[str, Any]


#: The sensors of each prediction: key suffix, name suffix, value template and what differs.
PREDICTION_SENSORS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("", "", "{{ value_json.predicted_close }}", {"icon": "mdi:chart-line"}),
    ("_lower_80", " 80% lower", "{{ value_json.lower_80 }}", {"icon": "mdi:arrow-collapse-down"}),
    ("_upper_80", " 80% upper", "{{ value_json.upper_80 }}", {"icon": "mdi:arrow-collapse-up"}),
    ("_skill", " skill", SKILL_TEMPLATE, {"icon": "mdi:bullseye-arrow", "unit_of_measurement": "%",
                                          "suggested_display_precision": 1, "entity_category": "diagnostic"}),
)  # fmt: skip


class MqttPublisher:
    def __init__(
        self,
        url: str,
        device_id: str,
        products: tuple[str, ...],
        *,
        discovery_prefix: str = "homeassistant",
        ca_file: str | None = None,
        configuration_url: str | None = None,
        live_price_gap_s: float = LIVE_PRICE_GAP_S,
        models_of: Callable[[str, int], list[str]] = lambda product, granularity: [],
        accuracy: Mapping[tuple[str, int, str], dict[str, float | None]] | None = None,
        live_prices: Callable[[], Mapping[str, float]] = dict,
        health: Conditions | None = None,
    ) -> None:
        self.device = slug(device_id)
        self.device_name = device_id  # Home Assistant's name of the device
        self.products = products
        self.prefix = discovery_prefix
        self.configuration_url = configuration_url
        self.live_price_gap_s = live_price_gap_s
        self.status_topic = f"cryptopi/{self.device}/status"
        self.feed_topic = f"cryptopi/{self.device}/feed"
        self.models: dict[tuple[str, int], list[str]] = {}
        self.models_of = models_of  # which models serve a product (announced as sensors)
        self.accuracy = accuracy if accuracy is not None else {}  # per (product, granularity, model)
        self.live_prices = live_prices  # the newest trade's price per product
        self._latest: dict[str, str] = {self.feed_topic: "OFF"}  # topic -> payload, re-sent on every connect
        self._prices: dict[str, float] = {}  # product -> newest live price, sent or not
        self._last_price_sent = -float("inf")
        self._price_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.health = health or Conditions()  # a broker that is away shows in /health, logged once
        self.client, self.broker = mqtt_client(url, f"cryptopi-{self.device}", ca_file=ca_file)
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(1000)  # bounded while the broker is away
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message

    def topic(self, product: str, granularity: int, model: str) -> str:
        return f"cryptopi/{self.device}/{slug(product)}/{horizon(granularity)[0]}/{slug(model)}"

    def price_topic(self, product: str) -> str:
        return f"cryptopi/{self.device}/{slug(product)}/price"

    def start(self) -> None:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        log.info("mqtt starting", extra={"broker": str(self.broker), "device": self.device})

    def stop(self) -> None:
        """Say ``offline`` (retained) before leaving, so dashboards know at once."""
        with self._lock:
            if self._price_timer is not None:
                self._price_timer.cancel()
        go_offline(self.client, self.status_topic)
        MQTT_CONNECTED.set(0)

    def set_models(self, product: str, granularity: int, models: list[str]) -> None:
        """The models to announce for ``product`` at ``granularity``; their sensors announced if they
        changed (only theirs: fifty products' every config on each change would be thousands)."""
        if self.models.get((product, granularity)) != models:
            self.models[product, granularity] = models
            if self.client.is_connected():
                self._announce(
                    self._prediction_sensors(product, granularity, models), {(product, granularity): models}
                )

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        """New predictions: announce their products' models if they changed, then publish them."""
        for product, granularity in {(r.product, r.granularity) for r in rows}:
            self.set_models(product, granularity, self.models_of(product, granularity))
        self.publish(rows)

    def on_trades(self) -> None:
        """Trades came in: pass on the live prices (``publish_live_price`` keeps the pace)."""
        for product, price in self.live_prices().items():
            self.publish_live_price(product, price)

    def publish(self, rows: list[PredictionRow]) -> None:
        for row in rows:
            topic = self.topic(row.product, row.granularity, row.model)
            accuracy = self.accuracy.get((row.product, row.granularity, row.model))
            payload = json.dumps(prediction_payload(row, accuracy))
            self._send(topic, payload, "prediction")

    def publish_live_price(self, product: str, price: float) -> None:
        """The newest trade's price: sent at once if the last send is ``live_price_gap_s`` old, else
        when that gap is over (so the newest price always goes out), and never when unchanged."""
        with self._lock:
            self._prices[product] = price
            if self._price_timer is not None or self._latest.get(self.price_topic(product)) == str(price):
                return
            wait = self._last_price_sent + self.live_price_gap_s - time.monotonic()
            if wait > 0:
                self._price_timer = threading.Timer(wait, self._send_prices)
                self._price_timer.daemon = True
                self._price_timer.start()
                return
        self._send_prices()

    def set_feed_connected(self, connected: bool) -> None:
        """The Coinbase feed's connection, for the connectivity binary_sensor (sent on change)."""
        payload = "ON" if connected else "OFF"
        with self._lock:
            if self._latest[self.feed_topic] == payload:
                return
        self._send(self.feed_topic, payload, "feed")

    def _send_prices(self) -> None:
        with self._lock:
            self._price_timer = None
            changed = {self.price_topic(p): str(v) for p, v in self._prices.items()}
            changed = {t: v for t, v in changed.items() if self._latest.get(t) != v}
            if changed:
                self._last_price_sent = time.monotonic()
            self._latest |= changed  # marked sent at once: a concurrent call finds nothing new
        for topic, payload in changed.items():
            self._publish(topic, payload, "live_price")

    def _send(self, topic: str, payload: str, kind: str) -> None:
        with self._lock:
            self._latest[topic] = payload
        self._publish(topic, payload, kind)

    def _publish(self, topic: str, payload: str | bytes, kind: str) -> None:
        """Publish retained at QoS 1; counted only when a connected client took it (paho queues the rest)."""
        if self.client.publish(topic, payload, qos=1, retain=True).rc == mqtt.MQTT_ERR_SUCCESS:
            MQTT_PUBLISHED.labels(kind).inc()

    # Home Assistant discovery ---------------------------------------------------------------------

    def announce(self) -> None:
        self._announce(self.discovery(), self.models)

    def _announce(self, configs: list[Discovery], models: Mapping[tuple[str, int], list[str]]) -> None:
        for d in configs:
            topic = f"{self.prefix}/{d.component}/cryptopi_{self.device}/{d.key}/config"
            self._publish(topic, json.dumps(d.config), "discovery")
        # Before horizons, each model's config sat at <product>_<model>: an empty retained payload
        # removes that entity from Home Assistant (and the broker), so an upgrade leaves no duplicate.
        for product, model in {(p, m) for (p, _), names in models.items() for m in names}:
            self.client.publish(f"{self.prefix}/sensor/cryptopi_{self.device}/{slug(product)}_{slug(model)}/config",
                                b"", qos=1, retain=True)  # fmt: skip

    def _prediction_sensors(self, product: str, granularity: int, models: list[str]) -> list[Discovery]:
        """Per model the predicted price, the 80 % interval's bounds and the realized skill."""
        out = []
        hid, words = horizon(granularity)
        for model in models:
            state = self.topic(product, granularity, model)
            for suffix, name, template, extra in PREDICTION_SENSORS:
                key = f"{slug(product)}_{hid}_{slug(model)}{suffix}"
                config = self._sensor(key, f"{product} {words} ({model}){name}", quote_currency(product))
                config |= {"state_topic": state, "value_template": template, **extra,
                           "expire_after": EXPIRE_AFTER_HORIZONS * granularity}  # fmt: skip
                if not suffix:  # the whole prediction, once
                    config["json_attributes_topic"] = state
                out.append(Discovery("sensor", key, config))
        return out

    def discovery(self) -> list[Discovery]:
        """Every entity of this appliance: per product, horizon and model the prediction sensors; per
        product the live price; the feed's connectivity."""
        out = [d for (p, g), models in self.models.items() for d in self._prediction_sensors(p, g, models)]
        for product in self.products:
            key = f"{slug(product)}_price"
            # A price is live only while the feed is: unavailable when either topic says so.
            live = {"availability": [{"topic": self.status_topic},
                                     {"topic": self.feed_topic, "payload_available": "ON",
                                      "payload_not_available": "OFF"}],
                    "availability_mode": "all"}  # fmt: skip
            config = self._sensor(key, f"{product} price", quote_currency(product), live)
            config |= {"state_topic": self.price_topic(product), "icon": "mdi:finance"}
            out.append(Discovery("sensor", key, config))
        feed = self._entity("binary_sensor", "feed", "Coinbase feed") | {
            "state_topic": self.feed_topic, "device_class": "connectivity", "entity_category": "diagnostic",
        }  # fmt: skip
        out.append(Discovery("binary_sensor", "feed", feed))
        return out

    def _sensor(
        self, key: str, name: str, unit: str, availability: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # No device_class "monetary": Home Assistant allows it only with state_class "total", and a
        # price level is a measurement (which is what gives it graphs and long-term statistics).
        return self._entity("sensor", key, name, availability) | {
            "unit_of_measurement": unit, "state_class": "measurement", "suggested_display_precision": 2,
        }  # fmt: skip

    def _entity(
        self, component: str, key: str, name: str, availability: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        device = ha_device(self.device_name) | {
            "model": "Coinbase price predictor",
            "sw_version": __version__,
        }
        if self.configuration_url:
            device["configuration_url"] = self.configuration_url
        return {
            "name": name,  # shown after the device's name: never repeats it
            "unique_id": f"cryptopi_{self.device}_{key}",
            **ha_entity_id(component, f"{self.device}_{key}"),
            **(availability or {"availability_topic": self.status_topic}),  # online / offline
            "device": device,
            "origin": ORIGIN,
        }

    # paho's thread --------------------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.health.problem("mqtt", "MQTT broker refused the connection", broker=str(self.broker),
                                reason=str(reason))  # fmt: skip
            return
        came_online(client, reason, self.status_topic)
        MQTT_CONNECTED.set(1)
        self.health.ok("mqtt")
        self.announce()
        with self._lock:
            latest = list(self._latest.items())
        for topic, payload in latest:
            client.publish(topic, payload, qos=1, retain=True)
        log.info("mqtt connected", extra={"broker": str(self.broker), "republished": len(latest)})

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        MQTT_CONNECTED.set(0)
        if reason.is_failure:  # not our own stop(): paho reconnects by itself
            self.health.problem("mqtt", "MQTT broker unreachable", broker=str(self.broker), error=str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """A connection attempt failed; paho calls this inside its ``except OSError``: that is the error."""
        error = sys.exc_info()[1]
        self.health.problem("mqtt", "MQTT broker unreachable", broker=str(self.broker),
                            error=str(error) or type(error).__name__)  # fmt: skip

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == HA_STATUS and message.payload == b"online":
            log.info("home assistant came online; re-announcing")
            self.announce()
