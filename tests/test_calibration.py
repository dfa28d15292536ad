"""On-device calibration of a product the pooled set serves (issue #12): from the product's own
history in the store, refused (the pooled quantiles serve, and say why) below 30 days, redone once a
market day, kept across a restart, and equal to what the training code computes on the same candles."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from appliance.calibration import CALIBRATION_DAYS, DAY, Calibrator, calibrate, candles_needed, rows_needed
from appliance.candle_csv import read_candle_csv
from appliance.candles import CandleRow, parse_time
from appliance.coinbase.rest import CoinbaseRest
from appliance.features import WINDOW, CandleSeries, feature_row
from appliance.health import Conditions
from appliance.inference import Inference
from appliance.mqtt import horizon, slug
from appliance.store import MIGRATIONS, Store
from tests.conftest import (
    BTC_1H,
    ETH_1H,
    REPO,
    Broker,
    MqttWatcher,
    all_predicting,
    replay_process,
    running_up,
)
from training.data import build_dataset, load_candles
from training.evaluate import calibrate as training_calibrate

PRODUCT = "SOL-USD"  # no version of its own in the shipped registry: the pooled set serves it
G = 3600
#: The market clock of these tests: the hour open at 2025-10-01T00:00Z (before the hold-out).
OPEN = 1759276800
ETH = [c.row() for c in read_candle_csv(ETH_1H)]


def closed_before(open_bucket: int, days: float) -> list[CandleRow]:
    """ETH-USD's real hourly candles (standing in for SOL-USD) of the ``days`` before ``open_bucket``."""
    return [r for r in ETH if open_bucket - days * DAY <= r.start < open_bucket]


@pytest.fixture
def rest_port() -> Iterator[int]:
    """Coinbase's REST as the replay server serves it: SOL-USD trading only since 2025-09-21."""
    with replay_process(["--candles", f"{PRODUCT}={ETH_1H}", "--from", "2025-09-21", "--to", "2025-10-02",
                         "--start-at", "2025-10-01T00:00:00Z", "--speed", "1"]) as port:  # fmt: skip
        yield port


class Device:
    """The appliance's calibration parts on one store, as ``runtime.up`` wires them."""

    def __init__(self, db: Path, rest: CoinbaseRest) -> None:
        self.store = Store(db)
        self.reader = Store(db, readonly=True)
        self.health = Conditions()
        self.inference = Inference(REPO / "appliance" / "models", (PRODUCT,), (G,), self.health)
        assert self.inference.reload()
        self.calibrator = Calibrator(self.store, self.reader, rest, self.inference, self.health)

    def close(self) -> None:
        self.store.close()
        self.reader.close()


def test_predictions_stored_before_the_migration_read_as_calibrated_in_training(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = sqlite3.connect(path)
    for number, migration in enumerate(MIGRATIONS[:-1], start=1):  # the schema before calibrations
        db.executescript(migration + f"; PRAGMA user_version = {number}")
    db.execute(
        "INSERT INTO predictions (product, model, as_of, model_version, granularity, target_time,"
        " last_close, predicted_close, lower_80, upper_80, lower_95, upper_95, created_at)"
        " VALUES ('BTC-USD', 'cnn', 7200, 'v1', 3600, 10800, 100, 100.5, 99, 101, 98, 102, 0)"
    )
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        (kept,) = store.predictions("BTC-USD", granularity=3600)
        assert (kept.calibration, kept.calibrated_at, kept.calibration_note) == ("training", None, None)
        assert store.calibrations() == []


async def test_too_little_history_says_so_and_the_pooled_quantiles_serve(
    tmp_path: Path, rest_port: int
) -> None:
    async with CoinbaseRest(f"http://127.0.0.1:{rest_port}") as rest:
        device = Device(tmp_path / "db.sqlite3", rest)
        result = await device.calibrator.check(PRODUCT, G, OPEN)
        assert result is not None
        assert result.method == "pooled"
        # Back-filled first: REST has ten days, all of which were fetched and counted.
        stored = device.store.series_rows(PRODUCT, G)
        assert [r.start for r in stored] == [r.start for r in closed_before(OPEN, 10)]
        usable = len(stored) - WINDOW
        assert result.reason == (
            f"{usable} candles of {G}s history to calibrate on ({usable * G / DAY:.1f} days), "
            f"{rows_needed(G)} ({CALIBRATION_DAYS} days) needed: the pooled set's intervals"
        )
        assert device.inference.calibration_of(PRODUCT, G) == result
        series = CandleSeries.from_rows(G, stored[-WINDOW:])
        loaded = device.inference.serving_of(PRODUCT, G)
        assert loaded is not None
        assert loaded.pooled
        for p in device.inference.predict(PRODUCT, series):
            assert (p.calibration, p.calibrated_at, p.calibration_note) == ("pooled", None, result.reason)
            q80 = loaded.models[p.model].quantiles["0.8"]  # the pooled set's own
            sigma = loaded.sigma(feature_row(series))
            assert p.lower_80 == pytest.approx(
                p.last_close * math.exp(math.log(p.predicted_close / p.last_close) - q80 * sigma), rel=1e-12
            )
        device.close()


async def test_calibrated_daily_from_its_own_history_and_kept_across_a_restart(
    tmp_path: Path, rest_port: int
) -> None:
    db = tmp_path / "db.sqlite3"
    async with CoinbaseRest(f"http://127.0.0.1:{rest_port}") as rest:
        device = Device(db, rest)
        # Forty days stored already (as the history keeper leaves them): nothing to fetch.
        device.store.upsert_history(PRODUCT, G, closed_before(OPEN, 40), "test")
        first = await device.calibrator.check(PRODUCT, G, OPEN)
        assert first is not None
        assert first.method == "device"
        assert first.reason is None
        assert (first.rows, first.through) == (rows_needed(G), OPEN)
        assert (first.first, first.last) == (OPEN - (rows_needed(G) + 1) * G, OPEN - 2 * G)
        assert device.inference.calibration_of(PRODUCT, G) == first
        assert device.health.current() == []
        # A market day less an hour later: not again.
        device.store.upsert_history(PRODUCT, G, closed_before(OPEN + DAY, 1), "test")
        assert await device.calibrator.check(PRODUCT, G, OPEN + DAY - G) is None
        # A market day later: again, from the newest 30 days.
        second = await device.calibrator.check(PRODUCT, G, OPEN + DAY)
        assert second is not None
        assert second.method == "device"
        assert (second.through, second.first) == (OPEN + DAY, OPEN + DAY - (rows_needed(G) + 1) * G)
        assert second.quantiles != first.quantiles
        device.close()
        # A restart takes the stored calibration as it is, and does not redo it.
        again = Device(db, rest)
        assert again.inference.calibration_of(PRODUCT, G) == second
        assert await again.calibrator.check(PRODUCT, G, OPEN + DAY + G) is None
        series = CandleSeries.from_rows(G, again.store.series_rows(PRODUCT, G, last=WINDOW))
        for p in again.inference.predict(PRODUCT, series):
            assert (p.calibration, p.calibrated_at) == ("device", second.calibrated_at)
        again.close()


def test_the_device_computes_what_training_computes_on_the_same_candles() -> None:
    """The appliance's calibration (served graphs, one row at a time) against the training code's
    (its dataset builder, its split-conformal calibration) on the same 30 days of candles."""
    inference = Inference(REPO / "appliance" / "models", (PRODUCT,), (G,))
    inference.reload()
    loaded = inference.serving_of(PRODUCT, G)
    assert loaded is not None
    assert loaded.pooled
    series = CandleSeries.from_rows(G, closed_before(OPEN, 2 * candles_needed(G) / 24))
    models = {name: m.log_return for name, m in loaded.models.items()}
    fitted = calibrate(series, loaded.sigma, models, rows_needed(G))
    ds = build_dataset(series, PRODUCT)
    rows = ds.take((ds.start >= fitted.first) & (ds.start <= fitted.last))
    assert len(rows) == fitted.rows == rows_needed(G)
    sigma = np.array([loaded.sigma(x) for x in rows.X])
    for name, m in loaded.models.items():
        expected = training_calibrate(rows, np.array([m.log_return(x) for x in rows.X]), sigma).served
        assert fitted.quantiles[name] == pytest.approx(expected, rel=1e-9)


#: The appliance's market: BTC-USD (its own version) and SOL-USD (ETH-USD's real hourly candles under a
#: name the registry has no version of), seven weeks of history before the start, an hour every 2 s.
UNSEEN_MARKET = ["--candles", f"BTC-USD={BTC_1H}", "--candles", f"{PRODUCT}={ETH_1H}",
                 "--from", "2026-03-01", "--to", "2026-05-01", "--start-at", "2026-04-20T00:30:00Z",
                 "--speed", "1800", "--heartbeat-s", "0.2"]  # fmt: skip
HORIZONS = (3600, 900)


def device_calibrated(health: dict[str, Any]) -> bool:
    sol = health["products"].get(PRODUCT, {}).get("horizons", {})
    return all(
        sol.get(str(g), {}).get("calibration", {})
        and sol[str(g)]["calibration"]["method"] == "device"
        and sol[str(g)]["prediction"] == "ok"
        for g in HORIZONS
    ) and all_predicting(health)


def consistent(url: str, g: int, model: str) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    """/health's calibration of SOL-USD at ``g`` and the newest prediction at both levels, read until
    both are the same prediction, made by that calibration (a candle closes every 2 s here, a market
    day and a recalibration pass every 48 s)."""
    for _ in range(20):
        calibration = httpx.get(f"{url}/health", timeout=5).json()["products"][PRODUCT]["horizons"][str(g)][
            "calibration"]  # fmt: skip
        got = {level: httpx.get(f"{url}/api/predict", timeout=5, params={
            "product": PRODUCT, "model": model, "granularity": g, "level": level}).json()
            for level in (0.8, 0.95)}  # fmt: skip
        same = got[0.8]["as_of"] == got[0.95]["as_of"]
        if same and all(
            p["calibration"]["calibrated_at"] == calibration["calibrated_at"] for p in got.values()
        ):
            return calibration, got
        time.sleep(0.5)
    raise AssertionError(f"{PRODUCT} {g}s: predictions never matched /health's calibration")


def test_the_appliance_serves_an_unseen_product_with_intervals_calibrated_on_the_device(
    tmp_path: Path, broker: Broker
) -> None:
    """End to end: SOL-USD's history back-filled from the replay server, the pooled set's intervals
    calibrated on it by the appliance, and every served interval equal (1e-9) to the one the training
    code computes from the same candles (its loader on the appliance's own store, its dataset builder,
    its calibration) through the same graphs."""
    watcher = MqttWatcher(broker.port, ["cryptopi/#"])
    db = tmp_path / "cryptopi.sqlite3"
    with running_up(tmp_path, broker, UNSEEN_MARKET, ready=device_calibrated,
                    products=f"BTC-USD,{PRODUCT}") as (url, _):  # fmt: skip
        btc = httpx.get(f"{url}/health", timeout=5).json()["products"]["BTC-USD"]["horizons"]["3600"]
        assert (btc["pooled"], btc["calibration"]["method"]) == (False, "training")
        offline = Inference(REPO / "appliance" / "models", (PRODUCT,), HORIZONS)
        offline.reload()
        for g in HORIZONS:
            loaded = offline.serving_of(PRODUCT, g)
            assert loaded is not None
            assert loaded.pooled
            for model, served in loaded.models.items():
                calibration, got = consistent(url, g, model)
                assert got[0.8]["pooled"]
                assert got[0.8]["model_version"] == loaded.manifest.version
                assert (got[0.8]["currency"], got[0.8]["calibration"]["method"]) == ("USD", "device")
                assert calibration["candles"] == rows_needed(g)
                # The training code's calibration, on the candles the appliance holds.
                ds = build_dataset(load_candles(db, PRODUCT, g), PRODUCT)
                first, last = (parse_time(calibration[k]) for k in ("first", "last"))
                rows = ds.take((ds.start >= first) & (ds.start <= last))
                assert len(rows) == rows_needed(g)
                sigma = np.array([loaded.sigma(x) for x in rows.X])
                q = training_calibrate(rows, np.array([served.log_return(x) for x in rows.X]), sigma).served
                # The prediction's candles, through the same graphs.
                as_of = parse_time(got[0.8]["as_of"])
                with Store(db, readonly=True) as store:
                    window = [r for r in store.series_rows(PRODUCT, g) if r.start < as_of][-WINDOW:]
                x = feature_row(CandleSeries.from_rows(g, window))
                close, r, s = window[-1].close, served.log_return(x), loaded.sigma(x)
                assert got[0.8]["last_close"] == close
                for level in (0.8, 0.95):
                    interval, k = got[level]["interval"], str(level)
                    assert interval["lower"] == pytest.approx(close * math.exp(r - q[k] * s), rel=1e-9)
                    assert interval["upper"] == pytest.approx(close * math.exp(r + q[k] * s), rel=1e-9)
                # MQTT carries it, and says how it was calibrated.
                suffix = f"/{slug(PRODUCT)}/{horizon(g)[0]}/{model}"

                def sent(suffix: str = suffix, as_of: int = as_of) -> dict[str, Any] | None:
                    topic = next((t for t in watcher.last if t.endswith(suffix)), None)
                    payload = json.loads(watcher.last[topic]) if topic else None
                    return payload if payload and payload["as_of"] >= as_of else None

                watcher.wait(lambda: sent() is not None, 30, suffix)
                mqtt = sent()
                assert mqtt is not None
                assert (mqtt["pooled"], mqtt["calibration"], mqtt["currency"]) == (True, "device", "USD")
    watcher.close()
