"""Health: one log line per change of state, not per retry; each part names what is wrong and since when."""

import logging
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.coinbase.rest import CoinbaseRest
from appliance.health import Conditions
from appliance.history import HistoryKeeper
from appliance.inference import Inference
from appliance.logs import JsonFormatter, LogfmtFormatter
from appliance.mqtt import MqttPublisher
from appliance.predictions import PredictionRow
from appliance.registry import latest_versions, set_latest
from appliance.replay.server import ReplayServer
from appliance.replay.tape import load_tape
from appliance.store import Store, TradeCommit
from tests.conftest import BTC_1H, REPO, SEPT_2025, Broker, MetricDelta, MqttWatcher, free_port, running_up


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def test_a_problem_logs_once_until_it_changes_or_clears(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.health")
    health = Conditions()
    for attempt in range(5):  # five retries of the same outage
        health.problem("coinbase", "Coinbase unreachable", host="ws-feed.exchange.coinbase.com",
                       attempt=attempt)  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == ["Coinbase unreachable"]
    problem = health.of("coinbase")
    assert problem is not None
    assert problem.detail == {"host": "ws-feed.exchange.coinbase.com", "attempt": 4}  # the latest details
    first_since = problem.since
    health.problem("coinbase", "Coinbase refused the subscription")
    assert caplog.records[-1].levelno == logging.WARNING
    assert health.current()[0].since >= first_since
    health.ok("coinbase")
    health.ok("coinbase")  # already fine: nothing more to say
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert caplog.records[-1].was == "Coinbase refused the subscription"  # type: ignore[attr-defined]
    assert health.current() == []


def test_subjects_are_separate_conditions() -> None:
    health = Conditions()
    health.problem("history", "back-fill failing", subject="BTC-USD")
    health.problem("history", "back-fill failing", subject="ETH-USD")
    health.ok("history", subject="BTC-USD")
    assert [(p.component, p.subject) for p in health.current()] == [("history", "ETH-USD")]
    assert health.of("history", "BTC-USD 3600s") is None


# -- each part's reasons, against real components -------------------------------------------------


def row(product: str, model: str, as_of: int, price: float) -> PredictionRow:
    return PredictionRow(product, model, as_of, "v1", 3600, as_of + 3600, price, price * 1.001,
                         price * 0.99, price * 1.01, price * 0.98, price * 1.02, 0.0)  # fmt: skip


def test_a_broker_that_is_down_is_one_warning_and_a_reason_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.health")
    broker = Broker(tmp_path)  # its port is chosen, nothing listens there yet
    health = Conditions()
    publisher = MqttPublisher(broker.url, "pi-down", ("BTC-USD",), health=health)
    publisher.set_models("BTC-USD", 3600, ["cnn"])
    grown = MetricDelta()
    publisher.start()
    try:
        wait_until(lambda: health.of("mqtt") is not None, 10, "the first failed connect")
        first = health.of("mqtt")
        assert first is not None
        assert first.message == "MQTT broker unreachable"
        assert first.detail["broker"] == f"127.0.0.1:{broker.port}"
        assert "refused" in first.detail["error"].lower(), first.detail
        publisher.publish([row("BTC-USD", "cnn", 7200, 100_000.0)])
        wait_until(lambda: health.of("mqtt") is not first, 20, "paho to retry")  # a retry updates the details
        assert grown("cryptopi_mqtt_published_total", kind="prediction") == 0, "nothing reached a broker"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == ["MQTT broker unreachable"], "not one line per retry"

        broker.start()
        watcher = MqttWatcher(broker.port, ["cryptopi/pi-down/#"])
        try:
            wait_until(lambda: health.of("mqtt") is None, 40, "paho to reconnect")
            watcher.wait(lambda: "cryptopi/pi-down/btc-usd/1h/cnn" in watcher.last, 10, "the kept value")
        finally:
            watcher.close()
        assert any(r.getMessage() == "mqtt recovered" for r in caplog.records)
        publisher.publish([row("BTC-USD", "cnn", 10800, 100_500.0)])
        assert grown("cryptopi_mqtt_published_total", kind="prediction") == 1
    finally:
        publisher.stop()
        broker.stop()


async def test_back_fill_failing_is_a_reason_per_product_until_it_works(tmp_path: Path) -> None:
    start = SEPT_2025[0]
    hour = start + 30 * 3600
    store = Store(tmp_path / "db.sqlite3")
    us = hour * 1_000_000
    store.commit_trades([TradeCommit("BTC-USD", {}, 1, 1, us, us)])
    health = Conditions()
    dead = free_port()
    unreachable = CoinbaseRest(f"http://127.0.0.1:{dead}", max_attempts=2, max_backoff_s=0.05)
    keeper = HistoryKeeper(store, unreachable, ["BTC-USD"], {3600: 24}, health=health)
    await keeper.check("BTC-USD", 3600)
    problem = health.of("history", "BTC-USD 3600s")
    assert problem is not None
    assert problem.message == "back-fill failing"
    assert "gave up after 2 attempts" in problem.detail["error"]
    assert problem.detail["retry"]

    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=start, end=start + 40 * 3600)
    srv = ReplayServer(trades, start_at_us=(hour + 3600) * 1_000_000)
    port = await srv.start()
    try:
        await keeper.rest.aclose()
        keeper.rest = CoinbaseRest(f"http://127.0.0.1:{port}")
        store.commit_trades([TradeCommit("BTC-USD", {}, 1, 2, (hour + 3600) * 1_000_000)])  # the next hour
        await keeper.check("BTC-USD", 3600)
    finally:
        await keeper.rest.aclose()
        await srv.close()
    assert health.of("history", "BTC-USD 3600s") is None
    assert len(store.candles("BTC-USD", 3600, source="history")) == 24


def test_refused_models_and_an_unreadable_registry_are_reasons(tmp_path: Path) -> None:
    shutil.copytree(REPO / "appliance" / "models", tmp_path, dirs_exist_ok=True)
    health = Conditions()
    inference = Inference(tmp_path, ("BTC-USD",), health=health)
    inference.reload()
    good = inference.serving[("BTC-USD", 3600)].manifest.version
    broken = "btc-usd-3600s-broken"
    shutil.copytree(tmp_path / good, tmp_path / broken)
    (tmp_path / broken / "lasso.onnx").write_bytes(b"not a model")
    set_latest(tmp_path, "BTC-USD", 3600, broken)
    inference.reload()
    refused = health.of("models", "BTC-USD 3600s")
    assert refused is not None
    assert refused.message == "model version refused"
    assert refused.detail["version"] == broken
    assert refused.detail["still_serving"] == good
    assert "lasso.onnx" in refused.detail["error"]

    latest = (tmp_path / "latest.json").read_text()
    (tmp_path / "latest.json").write_text("{")
    inference.reload()
    unreadable = health.of("models")
    assert unreadable is not None
    assert "unreadable" in unreadable.message
    (tmp_path / "latest.json").write_text(latest)
    inference.reload()
    assert health.of("models") is None

    fixed = "btc-usd-3600s-fixed"
    shutil.copytree(tmp_path / good, tmp_path / fixed)
    set_latest(tmp_path, "BTC-USD", 3600, fixed)
    inference.reload()
    assert health.current() == []


def test_up_explains_itself_in_health_and_logs(tmp_path: Path) -> None:
    """The real ``up``: a broker that is down and a refused model are named in /health and logged once;
    each prediction round is one INFO line; the log holds no colour codes."""
    models = tmp_path / "models"
    shutil.copytree(REPO / "appliance" / "models", models)
    eth = latest_versions(models)["ETH-USD"][3600]
    shutil.copytree(models / eth, models / "eth-usd-3600s-broken")
    (models / "eth-usd-3600s-broken" / "cnn.onnx").write_bytes(b"not a model")
    set_latest(models, "ETH-USD", 3600, "eth-usd-3600s-broken")
    dead = free_port()
    data = tmp_path / "data"
    data.mkdir()

    def btc_predicts(health: dict[str, Any]) -> bool:
        return bool(health["products"]["BTC-USD"]["prediction"] == "ok")

    with running_up(data, None, ready=btc_predicts, mqtt_url=f"mqtt://127.0.0.1:{dead}",
                    models_dir=str(models)) as (url, proc):  # fmt: skip
        with Store(data / "cryptopi.sqlite3", readonly=True) as store:
            first = len({p.as_of for p in store.predictions("BTC-USD")})
        wait_until(lambda: len({p.as_of for p in Store(data / "cryptopi.sqlite3", readonly=True)
                                .predictions("BTC-USD")}) >= first + 3, 30, "three more rounds")  # fmt: skip
        health = httpx.get(f"{url}/health").json()
        metrics = httpx.get(f"{url}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert health["status"] == "degraded"
    problems = {(p["component"], p["subject"]): p for p in health["problems"]}
    mqtt = problems[("mqtt", None)]
    assert mqtt["message"] == "MQTT broker unreachable"
    assert mqtt["detail"]["broker"] == f"127.0.0.1:{dead}"
    assert "refused" in mqtt["detail"]["error"].lower()
    models_problem = problems[("models", "ETH-USD 3600s")]
    assert models_problem["message"] == "model version refused"
    assert models_problem["detail"]["version"] == "eth-usd-3600s-broken"
    assert health["products"]["ETH-USD"]["prediction"] == "3600s: no model loaded"
    assert health["products"]["ETH-USD"]["horizons"]["3600"]["prediction"] == "no model loaded"
    assert 'cryptopi_mqtt_published_total{kind="prediction"} 0.0' in metrics or (
        "cryptopi_mqtt_published_total{" not in metrics
    )

    log = (data / "up.log").read_text()
    lines = log.splitlines()
    assert "\x1b" not in log
    assert "\\u001b" not in log
    assert "color_message" not in log
    warned = [line for line in lines if "level=warning" in line and "appliance.health" in line]
    assert sum('msg="MQTT broker unreachable"' in line for line in warned) == 1, warned
    assert sum('msg="model version refused"' in line for line in warned) == 1, warned
    rounds = [line for line in lines if 'msg="predictions made"' in line]
    with Store(data / "cryptopi.sqlite3", readonly=True) as store:
        made = [p for product in ("BTC-USD", "ETH-USD") for p in store.predictions(product)]
    # One line per round, naming each prediction made in it: every stored prediction, once.
    logged = [int(re.search(r" predictions=(\d+) ", r).group(1)) for r in rounds]  # type: ignore[union-attr]
    assert sum(logged) == len(made), "one INFO line per prediction round, each prediction in one"
    assert len(rounds) < len(made)
    assert all("level=info" in r for r in rounds)
    named = [f"{p.product}.{p.granularity}.{p.model}=" for p in made]
    assert all(any(n in r for r in rounds) for n in named)


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), JsonFormatter()])
def test_log_lines_carry_no_colour_codes_or_raw_control_characters(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "Started server process [%d]", (42,),
                               None)  # fmt: skip
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    record.error = "line one\nline two\x1b[31m"
    line = formatter.format(record)
    assert "\x1b" not in line
    assert "\n" not in line
    assert "color_message" not in line
    assert "Started server process [42]" in line
    assert "line one" in line
