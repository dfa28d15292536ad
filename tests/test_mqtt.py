"""MQTT against a real Mosquitto: retained predictions, availability, discovery, broker restarts."""

import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.mqtt import MqttPublisher
from appliance.predictions import PredictionRow
from tests.conftest import Broker, MqttWatcher

PRODUCTS = ("BTC-USD", "ETH-USD")
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def row(product: str, model: str, as_of: int, price: float) -> PredictionRow:
    return PredictionRow(product, model, as_of, "v1", 3600, as_of + 3600, price, price * 1.001,
                         price * 0.99, price * 1.01, price * 0.98, price * 1.02, 0.0)  # fmt: skip


# Home Assistant's MQTT sensor discovery schema, mirrored from home-assistant/core
# (components/mqtt/sensor.py, schemas.py, sensor/const.py; current Home Assistant needs Python >= 3.13,
# so it cannot be imported here). Unknown keys are dropped by HA; here they are refused, to catch typos.
class HaDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identifiers: list[str] = Field(min_length=1)
    name: str
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None


class HaOrigin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sw_version: str | None = None


class HaSensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None
    unique_id: str
    default_entity_id: str = Field(pattern=r"^sensor\.[a-z0-9_]+$")
    state_topic: str = Field(pattern=r"^[^#+]+$")
    value_template: str | None = None
    json_attributes_topic: str | None = None
    unit_of_measurement: str | None = None
    device_class: str | None = None
    state_class: Literal["measurement", "total", "total_increasing", "measurement_angle"] | None = None
    suggested_display_precision: int | None = Field(None, ge=0)
    icon: str | None = None
    expire_after: int | None = Field(None, ge=0)
    availability_topic: str | None = None
    payload_available: str = "online"
    payload_not_available: str = "offline"
    device: HaDevice | None = None
    origin: HaOrigin | None = None

    @model_validator(mode="after")
    def _rules(self) -> "HaSensor":
        if self.device_class == "monetary" and self.state_class not in (None, "total"):
            raise ValueError("HA allows device_class monetary only with state_class total")
        if self.device is not None and not self.unique_id:
            raise ValueError("a device needs a unique_id")
        return self


@pytest.fixture
def publisher(broker: Broker):
    p = MqttPublisher(broker.url, "pi-test", PRODUCTS, accuracy={("BTC-USD", "cnn"): {"mae": 250.0}})
    for product in PRODUCTS:
        p.set_models(product, ["cnn", "lasso"])
    p.start()
    yield p
    p.stop()


def test_predictions_are_retained_with_availability_and_discovery(
    broker: Broker, publisher: MqttPublisher
) -> None:
    publisher.publish([row("BTC-USD", "cnn", 7200, 100_000.0)])
    # A subscriber that arrives later still gets everything: it is retained.
    watcher = MqttWatcher(broker.port, ["cryptopi/#", "homeassistant/#"])
    try:
        watcher.wait(lambda: len([t for t in watcher.last if t.endswith("/config")]) == 4
                     and {"cryptopi/pi-test/btc-usd/cnn", "cryptopi/pi-test/status"} <= set(watcher.last),
                     10, "retained messages")  # fmt: skip
        assert watcher.last["cryptopi/pi-test/status"] == b"online"
        state = json.loads(watcher.last["cryptopi/pi-test/btc-usd/cnn"])
        assert state["predicted_close"] == 100_100.0
        assert (state["lower_80"], state["upper_80"]) == (99_000.0, 101_000.0)
        assert state["accuracy"] == {"mae": 250.0}
        for topic, payload in watcher.last.items():
            if topic.endswith("/config"):
                _, component, node, object_id, _ = topic.split("/")
                assert component == "sensor"
                assert HA_ID.match(node)
                assert HA_ID.match(object_id)
                config = HaSensor.model_validate_json(payload)
                assert config.availability_topic == "cryptopi/pi-test/status"
                assert config.state_topic.startswith("cryptopi/pi-test/")
    finally:
        watcher.close()


def test_discovery_is_repeated_when_home_assistant_comes_online(
    broker: Broker, publisher: MqttPublisher
) -> None:
    watcher = MqttWatcher(broker.port, ["homeassistant/sensor/#"])
    try:
        topic = "homeassistant/sensor/cryptopi_pi-test/eth-usd_lasso/config"
        watcher.wait(lambda: watcher.count.get(topic, 0) >= 1, 10, "the first announcement")
        before = watcher.count[topic]
        watcher.client.publish("homeassistant/status", "online", qos=1)
        watcher.wait(lambda: watcher.count[topic] > before, 10, "the re-announcement")
    finally:
        watcher.close()


def test_broker_restart_is_survived_and_the_latest_values_come_back(
    broker: Broker, publisher: MqttPublisher
) -> None:
    publisher.publish([row("ETH-USD", "lasso", 7200, 3000.0)])
    watcher = MqttWatcher(broker.port, ["cryptopi/#"])
    watcher.wait(lambda: "cryptopi/pi-test/eth-usd/lasso" in watcher.last, 10, "the first value")
    watcher.close()
    broker.stop()  # no persistence: every retained message is gone with it
    publisher.publish([row("ETH-USD", "lasso", 10800, 3100.0)])  # while the broker is away
    broker.start()
    watcher = MqttWatcher(broker.port, ["cryptopi/#"])
    try:
        watcher.wait(lambda: b"3103.1" in watcher.last.get("cryptopi/pi-test/eth-usd/lasso", b""), 40,
                     "the newest value to be re-published after the restart")  # fmt: skip
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-test/status") == b"online", 5, "online again")
    finally:
        watcher.close()


def test_a_clean_stop_says_offline(broker: Broker) -> None:
    p = MqttPublisher(broker.url, "pi-stop", PRODUCTS)
    p.start()
    watcher = MqttWatcher(broker.port, ["cryptopi/pi-stop/status"])
    try:
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-stop/status") == b"online", 10, "online")
        p.stop()
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-stop/status") == b"offline", 10, "offline")
    finally:
        watcher.close()
