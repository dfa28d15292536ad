"""Predictions over MQTT, with Home Assistant discovery (paho-mqtt, its own network thread).

Each prediction is published retained at QoS 1 to ``cryptopi/<device>/<product>/<model>``, so a
dashboard shows the last value at once. Availability is ``cryptopi/<device>/status``: ``online``
when connected, ``offline`` by last will (or on a clean stop). Discovery configs are sent on every
connect and again whenever Home Assistant announces ``online`` on ``homeassistant/status``. A broker
that is down never holds anything up: paho reconnects by itself, and on each connect the latest
values are published again (a restarted broker may have lost its retained messages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt

from appliance import __version__
from appliance.health import Conditions
from appliance.helpers.mqtt import mqtt_client
from appliance.metrics import MQTT_CONNECTED, MQTT_PUBLISHED
from appliance.predictions import PredictionRow

log = logging.getLogger(__name__)

HA_STATUS = "homeassistant/status"


def slug(text: str) -> str:
    """Home Assistant's id alphabet: [a-zA-Z0-9_-] (topics use it too)."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_")


def prediction_payload(row: PredictionRow, accuracy: dict[str, float | None] | None = None) -> dict[str, Any]:
    return {
        "product": row.product, "model": row.model, "model_version": row.model_version,
        "as_of": row.as_of, "target_time": row.target_time, "predicted_close": round(row.predicted_close, 2),
        "lower_80": round(row.lower_80, 2), "upper_80": round(row.upper_80, 2),
        "lower_95": round(row.lower_95, 2), "upper_95": round(row.upper_95, 2),
        "last_close": row.last_close, "accuracy": accuracy or {},
    }  # fmt: skip


class MqttPublisher:
    def __init__(
        self,
        url: str,
        device_id: str,
        products: tuple[str, ...],
        *,
        discovery_prefix: str = "homeassistant",
        ca_file: str | None = None,
        expire_after_s: int = 3 * 3600,
        models_of: Callable[[str], list[str]] = lambda product: [],
        accuracy: Mapping[tuple[str, str], dict[str, float | None]] | None = None,
        health: Conditions | None = None,
    ) -> None:
        self.device = slug(device_id)
        self.products = products
        self.prefix = discovery_prefix
        self.expire_after_s = expire_after_s
        self.status_topic = f"cryptopi/{self.device}/status"
        self.models: dict[str, list[str]] = {}
        self.models_of = models_of  # which models serve a product (announced as sensors)
        self.accuracy = accuracy if accuracy is not None else {}  # rolling accuracy per (product, model)
        self._latest: dict[str, str] = {}  # topic -> payload, re-published on every connect
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

    def topic(self, product: str, model: str) -> str:
        return f"cryptopi/{self.device}/{slug(product)}/{slug(model)}"

    def start(self) -> None:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        log.info("mqtt starting", extra={"broker": str(self.broker), "device": self.device})

    def stop(self) -> None:
        """Say ``offline`` (retained) before leaving, so dashboards know at once."""
        info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
        if self.client.is_connected():
            with contextlib.suppress(RuntimeError, ValueError):  # queued while disconnected: no wait
                info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()
        MQTT_CONNECTED.set(0)

    def set_models(self, product: str, models: list[str]) -> None:
        """The models to announce for ``product``; re-announced if they changed."""
        if self.models.get(product) != models:
            self.models[product] = models
            if self.client.is_connected():
                self.announce()

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        """New predictions: announce their products' models if they changed, then publish them."""
        for product in {r.product for r in rows}:
            self.set_models(product, self.models_of(product))
        self.publish(rows)

    def publish(self, rows: list[PredictionRow]) -> None:
        for row in rows:
            topic = self.topic(row.product, row.model)
            payload = json.dumps(prediction_payload(row, self.accuracy.get((row.product, row.model))))
            with self._lock:
                self._latest[topic] = payload
            self._send(topic, payload, "prediction")

    def announce(self) -> None:
        for product, models in self.models.items():
            for model in models:
                topic = f"{self.prefix}/sensor/cryptopi_{self.device}/{slug(product)}_{slug(model)}/config"
                self._send(topic, json.dumps(self.discovery_config(product, model)), "discovery")

    def _send(self, topic: str, payload: str, kind: str) -> None:
        """Publish retained at QoS 1; counted only when a connected client took it (paho queues the rest)."""
        if self.client.publish(topic, payload, qos=1, retain=True).rc == mqtt.MQTT_ERR_SUCCESS:
            MQTT_PUBLISHED.labels(kind).inc()

    def discovery_config(self, product: str, model: str) -> dict[str, Any]:
        state = self.topic(product, model)
        return {
            "name": f"{product} next hour ({model})",
            "unique_id": f"cryptopi_{self.device}_{slug(product)}_{slug(model)}",
            "default_entity_id": f"sensor.cryptopi_{slug(product)}_{slug(model)}".replace("-", "_"),
            "state_topic": state,
            "value_template": "{{ value_json.predicted_close }}",
            "json_attributes_topic": state,
            "unit_of_measurement": "USD",
            "state_class": "measurement",  # a price level; HA allows 'monetary' only with 'total'
            "suggested_display_precision": 2,
            "icon": "mdi:chart-line",
            "expire_after": self.expire_after_s,
            "availability_topic": self.status_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "identifiers": [f"cryptopi_{self.device}"], "name": f"cryptopi {self.device}",
                "manufacturer": "cryptopi", "model": "Coinbase next-hour predictor",
                "sw_version": __version__,
            },
            "origin": {"name": "cryptopi", "sw_version": __version__},
        }  # fmt: skip

    # paho's thread --------------------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.health.problem("mqtt", "MQTT broker refused the connection", broker=str(self.broker),
                                reason=str(reason))  # fmt: skip
            return
        MQTT_CONNECTED.set(1)
        self.health.ok("mqtt")
        client.subscribe(HA_STATUS, qos=1)
        client.publish(self.status_topic, "online", qos=1, retain=True)
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
