"""The appliance in a real Home Assistant (2024.3.3, started by ``tests/homeassistant.py``).

The real ``python -m appliance up`` runs on the replay server and Mosquitto with Home Assistant
subscribed: the device and entities as Home Assistant registers them, states equal to the API,
``unavailable`` on the last will, back after a restart, and Home Assistant's log clean.
"""

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance import __version__
from appliance.candle_csv import read_candle_csv
from appliance.candles import parse_time
from appliance.mqtt import MqttPublisher
from tests.conftest import BTC_1H, ETH_1H, appliance_up, free_port, replay_process
from tests.homeassistant import HomeAssistant, check_discovery

PRODUCTS = {"BTC-USD": BTC_1H, "ETH-USD": ETH_1H}
MODELS = ("cnn", "lasso", "persistence")
HORIZONS = {3600: ("1h", "next hour"), 900: ("15m", "next 15 min")}
#: A market that ends: both products, 2026-04-20 00:30 to 12:00 at an hour every 2 s. Once it has
#: played, every value is final, so Home Assistant's states can be compared with the API exactly.
END = "2026-04-20T12:00:00Z"
ENDING_MARKET = ["--candles", f"BTC-USD={BTC_1H}", "--candles", f"ETH-USD={ETH_1H}",
                 "--from", "2026-03-20", "--to", END, "--start-at", "2026-04-20T00:30:00Z",
                 "--speed", "1800", "--heartbeat-s", "0.2"]  # fmt: skip
#: Warnings of Home Assistant itself, none about what it was sent; each says why it is expected.
EXPECTED_WARNINGS = (
    # 2024.3 is the newest release for Python 3.11, the Pi's and the project's Python.
    "Support for the running Python version 3.11",
)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()``'s first truthy result; AssertionError naming ``what`` and the last one at the deadline."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)
    return result


def expected_entities() -> dict[str, tuple[str, str | None]]:
    """entity_id -> (name, unit): what the appliance should add to Home Assistant."""
    out: dict[str, tuple[str, str | None]] = {"binary_sensor.cryptopi_feed": ("Coinbase feed", None)}
    for product in PRODUCTS:
        p = product.lower().replace("-", "_")
        out[f"sensor.cryptopi_{p}_price"] = (f"{product} price", "USD")
        for (hid, words), model in ((h, m) for h in HORIZONS.values() for m in MODELS):
            base = f"sensor.cryptopi_{p}_{hid}_{model}"
            name = f"{product} {words} ({model})"
            out[base] = (name, "USD")
            out[f"{base}_lower_80"] = (f"{name} 80% lower", "USD")
            out[f"{base}_upper_80"] = (f"{name} 80% upper", "USD")
            out[f"{base}_skill"] = (f"{name} skill", "%")
    return out


def api_values(url: str) -> dict[str, str]:
    """entity_id -> the state Home Assistant should show, from the appliance's API and the market."""
    values = {"binary_sensor.cryptopi_feed": "on"}
    for product, csv in PRODUCTS.items():
        p = product.lower().replace("-", "_")
        last = [c for c in read_candle_csv(csv) if c.start < parse_time(END)][-1]
        values[f"sensor.cryptopi_{p}_price"] = str(last.row().close)  # the market's last trade
        for g, (hid, _) in HORIZONS.items():
            values |= horizon_values(url, product, g, f"sensor.cryptopi_{p}_{hid}")
    return values


def horizon_values(url: str, product: str, g: int, prefix: str) -> dict[str, str]:
    """One product's entities at one horizon, from the API."""
    values = {}
    accuracy = httpx.get(f"{url}/api/accuracy/{product}", params={"granularity": g}).json()
    skills = {a["model"]: a["skill"] for a in accuracy}
    for model in MODELS:
        params: dict[str, str | int] = {"product": product, "model": model, "granularity": g}
        got = httpx.get(f"{url}/api/predict", params=params).json()
        base = f"{prefix}_{model}"
        values[base] = str(round(got["predicted_close"], 2))
        values[f"{base}_lower_80"] = str(round(got["interval"]["lower"], 2))
        values[f"{base}_upper_80"] = str(round(got["interval"]["upper"], 2))
        values[f"{base}_skill"] = "unknown" if skills[model] is None else str(round(skills[model] * 100, 2))
    return values


def printed(values: dict[str, str]) -> dict[str, str]:
    """Numbers as Python prints their float ("77100.0", not "77100"), anything else as it is."""
    return {
        k: str(float(v)) if v.replace(".", "", 1).removeprefix("-").isdigit() else v
        for k, v in values.items()
    }


def shown(ha: HomeAssistant, entities: dict[str, Any]) -> dict[str, str]:
    """Home Assistant's states of ``entities``."""
    return printed({e: s["state"] for e, s in ha.states().items() if e in entities})


def last_as_of(url: str, product: str, granularity: int) -> int:
    params: dict[str, str | int] = {"product": product, "granularity": granularity}
    return parse_time(httpx.get(f"{url}/api/predict", params=params).json()["as_of"])


def registered(ha: HomeAssistant, count: int) -> dict[str, dict[str, Any]] | None:
    """The MQTT entities in Home Assistant's entity registry, once there are ``count`` of them."""
    entries = {e["entity_id"]: e for e in ha.ws("config/entity_registry/list") if e["platform"] == "mqtt"}
    return entries if len(entries) >= count else None


@pytest.mark.timeout(1200)  # the first run on a machine builds Home Assistant's venv (minutes)
def test_home_assistant_shows_the_appliance(home_assistant: HomeAssistant, tmp_path: Path) -> None:
    ha, broker = home_assistant, home_assistant.broker
    expected = expected_entities()
    port = free_port()  # the same after the restart, as on a Pi: the device's link stays the same
    with replay_process(ENDING_MARKET) as replay_port:
        with appliance_up(tmp_path, broker, replay_port, port) as (url, proc):
            # Every value is final once the market has played and both products predicted its last hour.
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{replay_port}/replay/status").json()["done"], 120,
                       "the market to end")  # fmt: skip
            last = {(p, g): parse_time(END) - g for p in PRODUCTS for g in HORIZONS}
            wait_until(lambda: all(last_as_of(url, *k) == t for k, t in last.items()), 60,
                       "both products' last predictions")  # fmt: skip
            want = printed(api_values(url))
            assert all(v != "unknown" for v in want.values()), f"some predictions came due unscored: {want}"

            registry = wait_until(lambda: registered(ha, len(expected)), 30, "every entity registered")
            assert set(registry) == set(expected)
            devices = [d for d in ha.ws("config/device_registry/list")
                       if ["mqtt", "cryptopi_cryptopi"] in d["identifiers"]]  # fmt: skip
            assert len(devices) == 1
            device = devices[0]
            assert (device["name"], device["manufacturer"], device["model"], device["sw_version"]) == (
                "cryptopi", "cryptopi", "Coinbase price predictor", __version__)  # fmt: skip
            assert device["configuration_url"] == f"{url}/"  # the default: the HTTP settings' address
            assert httpx.get(device["configuration_url"]).status_code == 200  # the dashboard
            states = ha.states()
            for entity_id, (name, unit) in expected.items():
                entry, state = registry[entity_id], states[entity_id]
                assert entry["device_id"] == device["id"]
                assert (entry["original_name"], entry["has_entity_name"]) == (name, True)
                attributes = state["attributes"]
                assert attributes["friendly_name"] == f"cryptopi {name}"  # the device's name, once
                assert attributes.get("unit_of_measurement") == unit
                if entity_id.startswith("sensor."):
                    assert attributes["state_class"] == "measurement"
                    assert "device_class" not in attributes
                else:
                    assert attributes["device_class"] == "connectivity"
            assert registry["binary_sensor.cryptopi_feed"]["entity_category"] == "diagnostic"
            cnn = states["sensor.cryptopi_btc_usd_1h_cnn"]["attributes"]
            api = httpx.get(f"{url}/api/predict", params={"product": "BTC-USD", "model": "cnn"}).json()
            assert (cnn["as_of"], cnn["model_version"]) == (parse_time(api["as_of"]), api["model_version"])

            # States equal to the API (the live price comes within the publisher's 10 s pace).
            wait_until(lambda: shown(ha, expected) == want, 30, f"Home Assistant's states to be {want}")

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_until(lambda: set(shown(ha, expected).values()) == {"unavailable"}, 30,
                       "every entity to turn unavailable on the last will")  # fmt: skip

        with appliance_up(tmp_path, broker, replay_port, port) as (url, _):
            wait_until(lambda: shown(ha, expected) == want, 60, "the same states back after a restart")
            assert printed(api_values(url)) == want

    problems = [r for r in ha.problems() if not r.message.startswith(EXPECTED_WARNINGS)]
    assert problems == [], "\n".join(f"{r.level} [{r.logger}] {r.message}" for r in problems)
    assert any("cryptopi" in r.message for r in ha.log())  # the log is the right one: discovery is in it


def test_every_discovery_key_is_in_home_assistants_own_schema(home_assistant: HomeAssistant) -> None:
    """2024.3.3's own MQTT schemas keep every key but default_entity_id, which only 2025.10 on reads
    (2024.3 takes the entity id from object_id); current Home Assistant's are mirrored in test_mqtt.py."""
    p = MqttPublisher("mqtt://127.0.0.1:1", "cryptopi", tuple(PRODUCTS), configuration_url="http://pi:8000/")
    for product in PRODUCTS:
        p.set_models(product, 3600, list(MODELS))
        p.set_models(product, 900, list(MODELS))
    payloads = [(d.component, d.config) for d in p.discovery()]
    results = check_discovery(home_assistant.venv, payloads)
    assert len(results) == len(payloads) == 2 * len(MODELS) * 2 * 4 + 2 + 1
    for (component, config), result in zip(payloads, results, strict=True):
        assert result == {"dropped": ["default_entity_id"]}, (component, json.dumps(config), result)
