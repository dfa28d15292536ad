"""``python -m appliance export``: the store's candles and scored predictions round-trip through CSV."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.candle_csv import read_candle_csv
from appliance.features import WINDOW, CandleSeries
from appliance.history import import_csv
from appliance.inference import Inference
from appliance.store import Store
from tests.conftest import BTC_1H, ETH_1H, REPO

START, END = 1756684800, 1756684800 + 10 * 86400  # 2025-09-01 .. 2025-09-11
PREDICTED = 30  # hours predicted, the newest one still open (no realized close)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real candles of both products and real predictions of the shipped models, most of them scored."""
    folder = tmp_path_factory.mktemp("export")
    path = folder / "cryptopi.sqlite3"
    with Store(path) as store:
        for product, csv_file in (("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)):
            rows = [c for c in read_candle_csv(csv_file) if START <= c.start < END]
            sliced = folder / f"{product}.csv"
            with sliced.open("w") as fh:
                fh.write("time,open,high,low,close,volume\n")
                for c in rows:
                    fh.write(f"{c.start},{c.open},{c.high},{c.low},{c.close},{c.volume}\n")
            import_csv(store, sliced, product, 3600, progress=False)
        inference = Inference(REPO / "appliance" / "models", ("BTC-USD",))
        inference.reload()
        candles = store.series_rows("BTC-USD", 3600)
        for end in range(len(candles) - PREDICTED, len(candles)):
            window = candles[end - WINDOW + 1 : end + 1]
            store.save_predictions(inference.predict("BTC-USD", CandleSeries.from_rows(3600, window)))
        store.realize({("BTC-USD", 3600): {r.start: r.close for r in candles}})
    return path


def export(store_path: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CRYPTOPI_DATA_DIR": str(store_path.parent)}
    return subprocess.run([sys.executable, "-m", "appliance", "export", "--out", str(out), *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_candles_round_trip_through_import_csv(store_path: Path, tmp_path: Path) -> None:
    done = export(store_path, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"candles_BTC-USD_3600.csv: {10 * 24} candles" in done.stdout
    again = Store(tmp_path / "again.sqlite3")
    with Store(store_path, readonly=True) as store:
        for product in ("BTC-USD", "ETH-USD"):
            exported = tmp_path / "out" / f"candles_{product}_3600.csv"
            result = import_csv(again, exported, product, 3600, progress=False)
            assert result.inserted == 10 * 24
            assert again.series_rows(product, 3600) == store.series_rows(product, 3600), "value for value"


def test_predictions_carry_their_realized_close_errors_and_coverage(store_path: Path, tmp_path: Path) -> None:
    done = export(store_path, tmp_path / "out", "--product", "BTC-USD")
    assert done.returncode == 0, done.stderr
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with Store(store_path, readonly=True) as store:
        stored = sorted(store.predictions("BTC-USD"), key=lambda p: (p.as_of, p.model))
    assert len(rows) == len(stored) == 3 * PREDICTED  # cnn, lasso and persistence
    for row, p in zip(rows, stored, strict=True):
        assert (row["product"], row["model"], int(row["granularity"])) == (p.product, p.model, 3600)
        assert float(row["predicted_close"]) == p.predicted_close
        assert float(row["lower_80"]) == p.lower_80
        assert row["target_time"].endswith("Z")
        if p.realized_close is None:  # the newest: its candle has not closed
            assert row["realized_close"] == row["error"] == row["inside_80"] == ""
            continue
        assert float(row["realized_close"]) == p.realized_close
        assert math.isclose(float(row["error"]), p.predicted_close - p.realized_close, rel_tol=1e-12)
        assert math.isclose(float(row["persistence_abs_error"]), abs(p.last_close - p.realized_close))
        assert row["inside_80"] == str(int(p.lower_80 <= p.realized_close <= p.upper_80))
        assert row["inside_95"] == str(int(p.lower_95 <= p.realized_close <= p.upper_95))
    assert sum(r["realized_close"] == "" for r in rows) == 3  # the newest of each model


def test_a_time_range_and_a_missing_store(store_path: Path, tmp_path: Path) -> None:
    done = export(store_path, tmp_path / "day", "--start", "2025-09-05", "--end", "2025-09-06T00:00:00Z")
    assert done.returncode == 0, done.stderr
    got = list(read_candle_csv(tmp_path / "day" / "candles_ETH-USD_3600.csv", 3600))
    assert [c.start for c in got] == list(range(START + 4 * 86400, START + 5 * 86400, 3600))
    with (tmp_path / "day" / "predictions.csv").open() as fh:
        assert list(csv.DictReader(fh)) == []  # every prediction was made on 2025-09-09 or later

    missing = export(tmp_path / "nowhere" / "cryptopi.sqlite3", tmp_path / "none")
    assert missing.returncode == 1
    assert "no store there" in missing.stderr
    assert "Traceback" not in missing.stderr
