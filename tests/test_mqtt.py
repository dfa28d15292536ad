"""MQTT on a real Mosquitto: retained predictions, live price, feed, availability, discovery, restarts."""

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.api.schemas import PredictionResult
from appliance.candles import quote_currency
from appliance.mqtt import Discovery, MqttPublisher, horizon, prediction_payload
from appliance.predictions import PredictionRow
from appliance.settings import Settings
from tests.conftest import Broker, MqttWatcher

PRODUCTS = ("BTC-USD", "ETH-USD")
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def row(product: str, model: str, as_of: int, price: float, granularity: int = 3600) -> PredictionRow:
    return PredictionRow(product, model, as_of, "v1", granularity, as_of + granularity, price, price * 1.001,
                         price * 0.99, price * 1.01, price * 0.98, price * 1.02, 0.0)  # fmt: skip


# Home Assistant's MQTT discovery schemas as current Home Assistant (2026.11) has them, mirrored from
# home-assistant/core (components/mqtt/schemas.py, config.py, sensor.py, binary_sensor.py); it needs
# Python >= 3.14, so it cannot run here (tests/test_homeassistant.py runs 2024.3.3's own schemas).
# Home Assistant drops unknown keys; here they are refused, to catch typos.
class HaDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identifiers: list[str] = Field(min_length=1)
    name: str
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None
    configuration_url: str | None = Field(None, pattern=r"^(https?|homeassistant)://[^/\s]+")


class HaOrigin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sw_version: str | None = None


class HaAvailability(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str = Field(pattern=r"^[^#+]+$")
    payload_available: str = "online"
    payload_not_available: str = "offline"


class HaEntity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None
    unique_id: str
    default_entity_id: str = Field(pattern=r"^[a-z_]+\.[a-z0-9_]+$")
    # Home Assistant before 2025.10 reads the entity id here; 2025.10 reads default_entity_id first, and
    # from 2026.4 the key is gone from the schema (dropped, without a warning).
    object_id: str = Field(pattern=r"^[a-z0-9_]+$")
    state_topic: str = Field(pattern=r"^[^#+]+$")
    value_template: str | None = None
    json_attributes_topic: str | None = None
    device_class: str | None = None
    entity_category: Literal["diagnostic"] | None = None  # "config" is refused for sensors
    icon: str | None = Field(None, pattern=r"^[a-z0-9-]+:[a-z0-9-]+$")
    expire_after: int | None = Field(None, gt=0)
    availability_topic: str | None = None
    availability: list[HaAvailability] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    device: HaDevice | None = None
    origin: HaOrigin | None = None

    @model_validator(mode="after")
    def _rules(self) -> "HaEntity":
        if self.availability_topic and self.availability:
            raise ValueError("availability_topic and availability are exclusive")
        if self.device is not None and not self.unique_id:
            raise ValueError("a device needs a unique_id")
        if self.default_entity_id.split(".")[1] != self.object_id:
            raise ValueError("object_id and default_entity_id must name the same entity")
        return self


class HaSensor(HaEntity):
    unit_of_measurement: str | None = None
    state_class: Literal["measurement", "total", "total_increasing", "measurement_angle"] | None = None
    suggested_display_precision: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _sensor_rules(self) -> "HaSensor":
        if self.device_class == "monetary" and self.state_class not in (None, "total"):
            raise ValueError("HA allows device_class monetary only with state_class total")
        if not self.default_entity_id.startswith("sensor."):
            raise ValueError("a sensor's entity id is sensor.*")
        return self


class HaBinarySensor(HaEntity):
    device_class: Literal["connectivity", "problem", "running"] | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"


def validate(d: Discovery) -> HaEntity:
    return (HaSensor if d.component == "sensor" else HaBinarySensor).model_validate(d.config)


@pytest.fixture
def publisher(broker: Broker):
    p = MqttPublisher(broker.url, "pi-test", PRODUCTS, configuration_url="http://pi-test:8000/",
                      accuracy={("BTC-USD", 3600, "cnn"): {"mae": 250.0}})  # fmt: skip
    for product in PRODUCTS:
        p.set_models(product, 3600, ["cnn", "lasso"])
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
        # per product: 2 models x (price, 2 bounds, skill) + the live price; and the feed

        def configs() -> dict[str, bytes]:  # the legacy topics' clearing may arrive too (empty payloads)
            return {t: p for t, p in watcher.last.items() if t.endswith("/config") and p}

        watcher.wait(lambda: len(configs()) == 2 * (2 * 4 + 1) + 1
                     and {"cryptopi/pi-test/btc-usd/1h/cnn", "cryptopi/pi-test/status"} <= set(watcher.last),
                     10, "retained messages")  # fmt: skip
        assert watcher.last["cryptopi/pi-test/status"] == b"online"
        assert watcher.last["cryptopi/pi-test/feed"] == b"OFF"  # nothing has said it connected
        state = json.loads(watcher.last["cryptopi/pi-test/btc-usd/1h/cnn"])
        assert state["predicted_close"] == 100_100.0
        assert (state["lower_80"], state["upper_80"]) == (99_000.0, 101_000.0)
        assert (state["granularity"], state["accuracy"]) == (3600, {"mae": 250.0})
        for topic, payload in configs().items():
            _, component, node, object_id, _ = topic.split("/")
            assert component in ("sensor", "binary_sensor")
            assert node == "cryptopi_pi-test"
            assert HA_ID.match(object_id)
            config = json.loads(payload)
            validate(Discovery(component, object_id, config))  # type: ignore[arg-type]
            assert config["state_topic"].startswith("cryptopi/pi-test/")
            assert config["device"]["configuration_url"] == "http://pi-test:8000/"
    finally:
        watcher.close()


def test_discovery_names_ids_units_and_horizons() -> None:
    p = MqttPublisher("mqtt://127.0.0.1:1", "cryptopi", ("BTC-EUR", "ETH-USD"))  # never connected
    p.set_models("BTC-EUR", 3600, ["cnn"])
    p.set_models("BTC-EUR", 900, ["lasso"])
    found = {d.config["default_entity_id"]: d for d in p.discovery()}
    entities = {e: (d.config["name"], d.config.get("unit_of_measurement")) for e, d in found.items()}
    assert entities == {
        "sensor.cryptopi_btc_eur_1h_cnn": ("BTC-EUR next hour (cnn)", "EUR"),
        "sensor.cryptopi_btc_eur_1h_cnn_lower_80": ("BTC-EUR next hour (cnn) 80% lower", "EUR"),
        "sensor.cryptopi_btc_eur_1h_cnn_upper_80": ("BTC-EUR next hour (cnn) 80% upper", "EUR"),
        "sensor.cryptopi_btc_eur_1h_cnn_skill": ("BTC-EUR next hour (cnn) skill", "%"),
        "sensor.cryptopi_btc_eur_15m_lasso": ("BTC-EUR next 15 min (lasso)", "EUR"),
        "sensor.cryptopi_btc_eur_15m_lasso_lower_80": ("BTC-EUR next 15 min (lasso) 80% lower", "EUR"),
        "sensor.cryptopi_btc_eur_15m_lasso_upper_80": ("BTC-EUR next 15 min (lasso) 80% upper", "EUR"),
        "sensor.cryptopi_btc_eur_15m_lasso_skill": ("BTC-EUR next 15 min (lasso) skill", "%"),
        "sensor.cryptopi_btc_eur_price": ("BTC-EUR price", "EUR"),
        "sensor.cryptopi_eth_usd_price": ("ETH-USD price", "USD"),
        "binary_sensor.cryptopi_feed": ("Coinbase feed", None),
    }
    for d in found.values():
        config = validate(d)
        assert config.device is not None
        assert config.device.name == "cryptopi"  # Home Assistant shows "cryptopi <entity name>"
        assert not config.name or not config.name.startswith("cryptopi")
        assert config.unique_id == f"cryptopi_cryptopi_{d.key}"
    assert (
        found["sensor.cryptopi_btc_eur_15m_lasso"].config["state_topic"]
        == "cryptopi/cryptopi/btc-eur/15m/lasso"
    )
    assert found["sensor.cryptopi_btc_eur_15m_lasso"].config["expire_after"] == 3 * 900
    assert (
        found["sensor.cryptopi_btc_eur_1h_cnn"].config["json_attributes_topic"]
        == "cryptopi/cryptopi/btc-eur/1h/cnn"
    )
    assert "json_attributes_topic" not in found["sensor.cryptopi_btc_eur_1h_cnn_skill"].config
    live = found["sensor.cryptopi_btc_eur_price"].config
    assert (live["state_topic"], live["availability_mode"]) == ("cryptopi/cryptopi/btc-eur/price", "all")
    assert [a["topic"] for a in live["availability"]] == [
        "cryptopi/cryptopi/status",
        "cryptopi/cryptopi/feed",
    ]
    feed = found["binary_sensor.cryptopi_feed"].config
    assert (feed["device_class"], feed["state_topic"]) == ("connectivity", "cryptopi/cryptopi/feed")
    assert "configuration_url" not in feed["device"]  # none was given


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [(3600, ("1h", "next hour")), (900, ("15m", "next 15 min")), (86400, ("24h", "next 24 hours")),
     (300, ("5m", "next 5 min"))],
)  # fmt: skip
def test_horizon_names(granularity: int, expected: tuple[str, str]) -> None:
    assert horizon(granularity) == expected


def test_units_come_from_the_quote_currency() -> None:
    assert [quote_currency(p) for p in ("BTC-USD", "ETH-EUR", "SOL-USDC", "ETH-BTC")] == [
        "USD",
        "EUR",
        "USDC",
        "BTC",
    ]


def test_prices_say_their_quote_currency_and_how_the_intervals_were_calibrated() -> None:
    """MQTT's payload and the API's answer of the same prediction: BTC-EUR is in EUR; a pooled set's
    device-calibrated prediction says so, with when."""
    own = row("BTC-EUR", "cnn", 7200, 60_000.0)
    pooled = replace(row("DOGE-EUR", "cnn", 7200, 0.2), model_version="pooled-3600s-x", calibration="device",
                     calibrated_at=1_800_000_000.0)  # fmt: skip
    assert prediction_payload(own)["currency"] == PredictionResult.of(own, 0.8, 1.0, None).currency == "EUR"
    sent, answered = prediction_payload(pooled), PredictionResult.of(pooled, 0.8, 1.0, None)
    assert (sent["pooled"], sent["calibration"], sent["calibrated_at"]) == (True, "device", 1_800_000_000.0)
    assert (answered.pooled, answered.calibration.method) == (True, "device")
    assert answered.calibration.calibrated_at == datetime.fromtimestamp(1_800_000_000, UTC)
    assert (prediction_payload(own)["pooled"], PredictionResult.of(own, 0.8, 1.0, None).pooled) == (
        False,
        False,
    )


def test_the_dashboard_url_is_a_setting_with_a_default_from_the_http_settings(tmp_path) -> None:
    assert Settings(http_host="192.168.1.20", http_port=8080).dashboard_url == "http://192.168.1.20:8080/"
    assert Settings(http_host="::1").dashboard_url == "http://[::1]:8000/"
    assert re.fullmatch(
        r"http://[^/:]+:8000/", Settings(http_host="0.0.0.0").dashboard_url
    )  # this host's name
    assert (
        Settings(public_url="https://cryptopi.example.com/").dashboard_url == "https://cryptopi.example.com/"
    )
    with pytest.raises(ValidationError, match="is not a http/https URL"):
        Settings(public_url="cryptopi.example.com")


def test_discovery_is_repeated_when_home_assistant_comes_online(
    broker: Broker, publisher: MqttPublisher
) -> None:
    watcher = MqttWatcher(broker.port, ["homeassistant/sensor/#"])
    try:
        topic = "homeassistant/sensor/cryptopi_pi-test/eth-usd_1h_lasso_upper_80/config"
        watcher.wait(lambda: watcher.count.get(topic, 0) >= 1, 10, "the first announcement")
        before = watcher.count[topic]
        watcher.client.publish("homeassistant/status", "online", qos=1)
        watcher.wait(lambda: watcher.count[topic] > before, 10, "the re-announcement")
    finally:
        watcher.close()


def test_configs_of_the_old_scheme_are_removed(broker: Broker) -> None:
    """Before horizons, each model's config sat at <product>_<model>; it must not linger as a duplicate."""
    legacy = "homeassistant/sensor/cryptopi_pi-old/btc-usd_cnn/config"
    old = MqttWatcher(broker.port, [])
    old.client.publish(
        legacy, json.dumps({"name": "BTC-USD next hour (cnn)"}), qos=1, retain=True
    ).wait_for_publish(5)
    old.close()
    watcher = MqttWatcher(broker.port, ["homeassistant/#"])
    watcher.wait(lambda: legacy in watcher.last, 10, "the old config")
    p = MqttPublisher(broker.url, "pi-old", ("BTC-USD",))
    p.set_models("BTC-USD", 3600, ["cnn"])
    p.start()
    try:
        watcher.wait(lambda: watcher.last.get(legacy) == b"", 10, "the old config to be cleared")
        watcher.close()
        # Subscriptions are served in order: once the status (retained) arrives, a retained legacy
        # config would have arrived before it.
        later = MqttWatcher(broker.port, [legacy, "cryptopi/pi-old/status"])
        later.wait(lambda: "cryptopi/pi-old/status" in later.last, 10, "the status")
        assert legacy not in later.last
        later.close()
    finally:
        p.stop()


def test_live_price_is_rate_limited_sent_on_change_and_the_newest_always_goes_out(broker: Broker) -> None:
    watcher = MqttWatcher(broker.port, ["cryptopi/pi-live/#"])
    topic, feed = "cryptopi/pi-live/btc-usd/price", "cryptopi/pi-live/feed"
    p = MqttPublisher(broker.url, "pi-live", ("BTC-USD",), live_price_gap_s=3600)
    p.start()
    try:
        watcher.wait(lambda: watcher.last.get(feed) == b"OFF", 10, "connected")
        for price in (100.5, 101.0, 101.5):  # one hour apart at most: only the first goes out now
            p.publish_live_price("BTC-USD", price)
        p.set_feed_connected(True)  # published after the prices: once it arrives, so would they have
        watcher.wait(lambda: watcher.last.get(feed) == b"ON", 10, "the feed")
        assert (watcher.count.get(topic), watcher.last.get(topic)) == (1, b"100.5")
    finally:
        p.stop()
    p = MqttPublisher(broker.url, "pi-live", ("BTC-USD",), live_price_gap_s=0.2)
    p.start()
    try:
        watcher.wait(lambda: watcher.last.get(feed) == b"OFF", 10, "connected again")
        before = watcher.count[topic]
        p.publish_live_price("BTC-USD", 102.0)
        p.publish_live_price("BTC-USD", 102.5)  # inside the gap: sent when it is over
        watcher.wait(lambda: watcher.last.get(topic) == b"102.5", 10, "the newest price")
        assert watcher.count[topic] == before + 2
        p.publish_live_price("BTC-USD", 102.5)  # unchanged: nothing
        p.set_feed_connected(True)
        watcher.wait(lambda: watcher.last.get(feed) == b"ON", 10, "the feed")
        p.set_feed_connected(False)
        watcher.wait(lambda: watcher.last.get(feed) == b"OFF", 10, "the feed going")
        assert watcher.count[topic] == before + 2
    finally:
        p.stop()
        watcher.close()


def test_broker_restart_is_survived_and_the_latest_values_come_back(
    broker: Broker, publisher: MqttPublisher
) -> None:
    publisher.publish([row("ETH-USD", "lasso", 7200, 3000.0)])
    publisher.publish_live_price("ETH-USD", 3001.5)
    publisher.set_feed_connected(True)
    watcher = MqttWatcher(broker.port, ["cryptopi/#"])
    watcher.wait(lambda: "cryptopi/pi-test/eth-usd/1h/lasso" in watcher.last, 10, "the first value")
    watcher.close()
    broker.stop()  # no persistence: every retained message is gone with it
    publisher.publish([row("ETH-USD", "lasso", 10800, 3100.0)])  # while the broker is away
    broker.start()
    watcher = MqttWatcher(broker.port, ["cryptopi/#"])
    try:
        watcher.wait(lambda: b"3103.1" in watcher.last.get("cryptopi/pi-test/eth-usd/1h/lasso", b""), 40,
                     "the newest value to be re-published after the restart")  # fmt: skip
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-test/status") == b"online", 5, "online again")
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-test/eth-usd/price") == b"3001.5", 5, "the price")
        watcher.wait(lambda: watcher.last.get("cryptopi/pi-test/feed") == b"ON", 5, "the feed")
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
