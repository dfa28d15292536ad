"""``python -m appliance up`` against the replay server: live trades in, the same predictions out."""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from appliance.candle_csv import read_candle_csv
from appliance.candles import parse_time
from appliance.features import WINDOW, CandleSeries
from appliance.inference import Inference
from appliance.store import Store
from tests.conftest import BTC_1H, ETH_1H, REPO, Broker, MqttWatcher, running_up


@pytest.fixture(scope="module")
def appliance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, Broker]]:
    data = tmp_path_factory.mktemp("up")
    broker = Broker(data)
    broker.start()
    try:
        with running_up(data, broker) as (url, proc):
            yield url, proc, data, broker
    finally:
        broker.stop()


def test_live_prediction_equals_the_models_on_the_real_candles(appliance) -> None:
    url, *_ = appliance
    for product, csv in (("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)):
        got = httpx.get(f"{url}/api/predict", params={"product": product, "model": "cnn"}).json()
        as_of = parse_time(got["as_of"])
        real = [c.row() for c in read_candle_csv(csv) if c.start < as_of][-WINDOW:]
        offline = Inference(REPO / "appliance" / "models", (product,))
        offline.reload()
        expected = {p.model: p for p in offline.predict(product, CandleSeries.from_rows(3600, real))}
        assert got["last_close"] == real[-1].close
        assert got["predicted_close"] == pytest.approx(expected["cnn"].predicted_close, rel=1e-9)
        assert got["interval"]["lower"] < got["predicted_close"] < got["interval"]["upper"]
        assert parse_time(got["target_time"]) == as_of + 3600
        both = httpx.get(f"{url}/api/predictions/{product}").json()
        assert {p["model"] for p in both} == {"cnn", "lasso", "persistence"}


def test_predictions_keep_coming_at_every_horizon_without_a_gap(appliance) -> None:
    """Past the start, back-filled history keeps every horizon whole: a prediction for every hour and
    for every quarter of an hour. The start's own candles are not judged: the one ingest began in is
    trade-built only in part and waits for REST, and at this replay's speed (a quarter every 0.5 s)
    the next ones close meanwhile; the predictor then predicts the newest, never the past."""
    url, _, data, _ = appliance
    first = parse_time(httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}).json()["as_of"])
    deadline = time.monotonic() + 30
    while (
        parse_time(httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}).json()["as_of"])
        < first + 5 * 3600
    ):
        assert time.monotonic() < deadline, (data / "up.log").read_text()[-3000:]
        time.sleep(0.2)
    health = httpx.get(f"{url}/health").json()
    assert {p["prediction"] for p in health["products"].values()} == {"ok"}, health
    with Store(data / "cryptopi.sqlite3", readonly=True) as store:
        state = store.ingest_state("BTC-USD")
        assert state is not None
        assert state.first_trade_time_us is not None
        settled = state.first_trade_time_us // 1_000_000 + 3600  # an hour of market after ingest began
        for g in (3600, 900):
            made = {p.as_of for p in store.predictions("BTC-USD", model="cnn", granularity=g)}
            closes = sorted(c for c in made if c >= settled)
            assert len(closes) >= 3 * 3600 // g  # three hours at least (each horizon starts on its own)
            assert closes == list(range(closes[0], closes[-1] + g, g)), f"a gap at {g}s"


def test_realized_accuracy_matches_the_real_closes(appliance) -> None:
    """Hourly predictions come true against the real hourly closes; 15-minute ones against the candles
    the trades built (the replay's intra-hour path is generated), each horizon scored on its own."""
    url, _, data, _ = appliance
    real_close = {c.start + 3600: c.row().close for c in read_candle_csv(BTC_1H)}  # close time -> close
    with Store(data / "cryptopi.sqlite3", readonly=True) as store:
        built_close = {r.start + 900: r.close for r in store.series_rows("BTC-USD", 900)}
        realized = {
            g: [p for p in store.predictions("BTC-USD", model="lasso", granularity=g) if p.realized_close]
            for g in (3600, 900)
        }
    for g, closes in ((3600, real_close), (900, built_close)):
        rows = realized[g]
        assert len(rows) >= 3
        assert all(p.realized_close == closes[p.target_time] for p in rows), g
        params: dict[str, int | str] = {"granularity": g}
        scores = {a["model"]: a for a in httpx.get(f"{url}/api/accuracy/BTC-USD", params=params).json()}
        assert set(scores) == {"cnn", "lasso", "persistence"}
        lasso = scores["lasso"]
        assert lasso["predictions"] >= len(rows)
        assert 0 <= lasso["coverage_80"] <= lasso["coverage_95"] <= 1
        assert lasso["skill"] == pytest.approx(1 - lasso["mae"] / lasso["persistence_mae"])
        one = httpx.get(
            f"{url}/api/accuracy/BTC-USD", params=params | {"model": "lasso", "window": len(rows)}
        )
        with Store(data / "cryptopi.sqlite3", readonly=True) as store:
            newest = store.predictions("BTC-USD", model="lasso", granularity=g, limit=len(rows))
        errors = [abs(p.predicted_close - p.realized_close) for p in newest if p.realized_close is not None]
        assert one.json()[0]["mae"] == pytest.approx(sum(errors) / len(errors))
    metrics = httpx.get(f"{url}/metrics").text
    for g in (3600, 900):
        assert f'cryptopi_realized_mae{{granularity="{g}",model="persistence",product="BTC-USD"}}' in metrics
    assert httpx.get(f"{url}/api/accuracy/BTC-USD", params={"model": "oracle"}).status_code == 404


def test_health_candles_metrics_and_openapi(appliance) -> None:
    url, *_ = appliance
    health = httpx.get(f"{url}/health").json()
    assert health["ingest_connected"] is True
    assert set(health["products"]) == {"BTC-USD", "ETH-USD"}
    assert all(p["model_version"] for p in health["products"].values())
    candles = httpx.get(f"{url}/api/candles/BTC-USD").json()
    assert len(candles) == 48  # the default: the newest 48 of the WINDOW or more kept for the models
    metrics = httpx.get(f"{url}/metrics").text
    assert "cryptopi_http_request_seconds_bucket" in metrics
    assert 'cryptopi_model_info{model="cnn",product="BTC-USD"' in metrics
    assert "/api/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/api/predict", {"product": "DOGE-USD"}, 404, "unknown product DOGE-USD"),
        ("/api/predict", {"product": "btc usd"}, 422, "product"),
        ("/api/predict", {"product": "BTC-USD", "model": "oracle"}, 404, "no model oracle"),
        ("/api/predict", {"product": "BTC-USD", "at": "yesterday"}, 422, "at:"),
        ("/api/predict", {"product": "BTC-USD", "at": "2001-01-01"}, 404, "at or before"),
        ("/api/predict", {"product": "BTC-USD", "level": "0.5"}, 422, "level"),
        ("/api/predict", {}, 422, "product"),
        ("/api/candles/BTC-USD", {"granularity": "7"}, 422, "granularity"),
        ("/api/candles/BTC-USD", {"start": "soon"}, 422, "start:"),
        ("/api/predictions/NOPE-USD", {}, 404, "unknown product"),
    ],
)
def test_bad_requests_get_a_clear_4xx(appliance, path: str, params: dict[str, str], status: int,
                                      message: str) -> None:  # fmt: skip
    url, *_ = appliance
    response = httpx.get(f"{url}{path}", params=params)
    assert response.status_code == status
    assert message in response.text


def test_the_stream_sends_the_candle_in_progress_from_memory(appliance) -> None:
    """The live candle of each horizon comes from ingest between its commits: each event of a candle
    is a beginning of the candle stored once it has closed (same open, range inside, volume so far)."""
    url, *_ = appliance

    async def listen(seconds: float) -> list[dict[str, Any]]:
        async with websockets.connect(url.replace("http", "ws") + "/api/stream") as ws:
            events = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 0.5)))
            return events

    events = asyncio.run(listen(7))  # three to four hours of market
    assert events[0]["type"] == "snapshot"
    assert [e["granularity"] for e in events[1:3]] == [3600, 900], "each candle in progress follows it"
    for g in (3600, 900):
        seen: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            if e["type"] == "candle" and e["product"] == "BTC-USD" and e["granularity"] == g:
                seen.setdefault(e["candle"]["time"], []).append(e["candle"])
        answer = httpx.get(f"{url}/api/candles/BTC-USD", params={"granularity": g}).json()
        stored = {c["time"]: c for c in answer}
        closed = [start for start in seen if start in stored]
        assert len(closed) >= 2, (g, sorted(seen), sorted(stored)[-3:])
        for start in closed:
            final, volumes = stored[start], [c["volume"] for c in seen[start]]
            assert volumes == sorted(volumes)
            for c in seen[start]:
                assert c["open"] == final["open"]
                assert final["low"] <= c["low"] <= c["high"] <= final["high"]
                assert c["volume"] <= final["volume"] * (1 + 1e-12)


def test_mqtt_carries_the_prediction_the_api_serves(appliance) -> None:
    url, _, _, broker = appliance
    watcher = MqttWatcher(broker.port, ["cryptopi/#", "homeassistant/#"])
    try:
        wanted = {"cryptopi/cryptopi/btc-usd/1h/cnn", "cryptopi/cryptopi/status",
                  "homeassistant/sensor/cryptopi_cryptopi/eth-usd_1h_lasso/config"}  # fmt: skip
        watcher.wait(lambda: wanted <= set(watcher.last), 10, "retained prediction, status and discovery")
        assert watcher.last["cryptopi/cryptopi/status"] == b"online"
        api = httpx.get(f"{url}/api/predict", params={"product": "BTC-USD", "model": "cnn"}).json()
        watcher.wait(lambda: json.loads(watcher.last["cryptopi/cryptopi/btc-usd/1h/cnn"])["as_of"]
                     >= parse_time(api["as_of"]), 10, "the API's prediction on MQTT")  # fmt: skip
        mqtt = json.loads(watcher.last["cryptopi/cryptopi/btc-usd/1h/cnn"])
        if mqtt["as_of"] == parse_time(api["as_of"]):
            assert mqtt["predicted_close"] == round(api["predicted_close"], 2)
            assert mqtt["model_version"] == api["model_version"]
    finally:
        watcher.close()


def test_last_will_says_offline_when_the_appliance_is_killed(tmp_path: Path, broker: Broker) -> None:
    watcher = MqttWatcher(broker.port, ["cryptopi/cryptopi/status"])
    try:
        with running_up(tmp_path, broker) as (_, proc):
            watcher.wait(lambda: watcher.last.get("cryptopi/cryptopi/status") == b"online", 10, "online")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            watcher.wait(
                lambda: watcher.last.get("cryptopi/cryptopi/status") == b"offline", 10, "the last will"
            )
    finally:
        watcher.close()


def test_generated_requests_from_the_openapi_schema_never_get_a_5xx(appliance, tmp_path: Path) -> None:
    """Property-based: schemathesis reads /openapi.json and sends what it generates, checking each answer."""
    url, *_ = appliance
    events = tmp_path / "events.ndjson"
    out = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "150", "--seed", "1",
         "--report", "ndjson", "--report-ndjson-path", str(events)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,  # its example cache stays out of the repo
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    statuses: list[int] = []

    def collect(node: object) -> None:  # every recorded request/response pair, wherever it nests
        if isinstance(node, dict):
            if "request" in node and isinstance(node.get("response"), dict):
                statuses.append(node["response"]["status_code"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for line in events.read_text().splitlines():
        collect(json.loads(line))
    assert len(statuses) >= 500, f"only {len(statuses)} requests were generated\n{out.stdout[-2000:]}"
    assert max(statuses) < 500


def test_sigterm_stops_cleanly(appliance) -> None:
    _, proc, data, broker = appliance
    watcher = MqttWatcher(broker.port, ["cryptopi/cryptopi/status"])
    watcher.wait(lambda: watcher.last.get("cryptopi/cryptopi/status") == b"online", 10, "online")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    watcher.wait(lambda: watcher.last.get("cryptopi/cryptopi/status") == b"offline", 10, "offline on SIGTERM")
    watcher.close()
    assert "appliance stopped" in (data / "up.log").read_text()
    with Store(data / "cryptopi.sqlite3") as store:
        assert store.integrity_check() == "ok"
        assert store.predictions("BTC-USD", model="cnn")
