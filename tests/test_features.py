"""Feature spec v1 on real data: pinned against a plain-Python textbook computation, serving equals
training, lags follow timestamps across real holes."""

import csv
import dataclasses
import json
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from appliance import features
from appliance.features import (
    FEATURE_NAMES,
    N_FEATURES,
    SPEC_HASH,
    SPEC_NAME,
    WINDOW,
    CandleSeries,
    MissingHistory,
    feature_matrix,
    feature_row,
    realized_volatility,
)
from tests.conftest import BTC_1H, DATASETS, REPO
from training.data import build_dataset

# A real hole in Coinbase's hourly data: 2025-10-25 16:00 .. 20:00 UTC (5 candles) are missing.
HOLE_FIRST = int(datetime(2025, 10, 25, 16, tzinfo=UTC).timestamp())
HOLE_LAST = int(datetime(2025, 10, 25, 20, tzinfo=UTC).timestamp())
H = 3600


def upto(s: CandleSeries, i: int) -> CandleSeries:
    return CandleSeries(s.granularity, s.start[: i + 1], s.open[: i + 1], s.high[: i + 1], s.low[: i + 1],
                        s.close[: i + 1], s.volume[: i + 1])  # fmt: skip


def test_spec_names_are_unique_and_hash_is_stable() -> None:
    assert len(set(FEATURE_NAMES)) == N_FEATURES == 69
    # The shipped models recorded the spec they were trained on: this build computes the same one.
    specs = [
        json.loads(m.read_text())["feature_spec"]
        for m in (REPO / "appliance" / "models").glob("*/manifest.json")
    ]
    recorded = {spec["hash"]: spec["name"] for spec in specs}
    assert recorded.get(SPEC_HASH) == SPEC_NAME
    assert features._spec_hash() == SPEC_HASH


@pytest.mark.parametrize(("parameter", "value"), [("LAGS", 23), ("ROLLING", 12), ("RETURN_SPANS", (2, 3)),
                                                  ("RSI_PERIOD", 7), ("SPEC_NAME", "other")])  # fmt: skip
def test_spec_hash_changes_with_every_parameter(
    monkeypatch: pytest.MonkeyPatch, parameter: str, value: object
) -> None:
    monkeypatch.setattr(features, parameter, value)
    assert features._spec_hash() != SPEC_HASH


def read_csv(path: Path) -> dict[int, tuple[float, ...]]:
    """Candles straight from the CSV (time -> open, high, low, close, volume), not the project's reader."""
    with path.open() as fh:
        return {
            int(datetime.fromisoformat(r["time"]).timestamp()):
                tuple(float(r[k]) for k in ("open", "high", "low", "close", "volume"))
            for r in csv.DictReader(fh)
        }  # fmt: skip


def textbook_rsi(closes: list[float]) -> float:
    """RSI over the last 14 changes, with simple averages (Cutler's RSI)."""
    changes = [b - a for a, b in zip(closes[-15:-1], closes[-14:], strict=True)]
    gain = sum(d for d in changes if d > 0) / 14
    loss = sum(-d for d in changes if d < 0) / 14
    if loss == 0:
        return 50.0 if gain == 0 else 100.0
    return 100 - 100 / (1 + gain / loss)


def textbook_features(candles: dict[int, tuple[float, ...]], t: int, g: int) -> dict[str, float]:
    """The v1 columns of the candle opening at ``t``, one by one in plain Python, by name."""
    o, h, lo, c, v = candles[t]
    close = [candles[t - k * g][3] for k in range(25)]  # close[k] is the close k candles ago
    volume = [candles[t - k * g][4] for k in range(25)]
    when = datetime.fromtimestamp(t, UTC)
    hour = when.hour + when.minute / 60
    out = {f"close_lag_{k}": math.log(close[k] / c) for k in range(1, 25)}
    out |= {f"volume_lag_{k}": math.log1p(volume[k]) for k in range(1, 25)}
    out |= {"open": math.log(o / c), "high": math.log(h / c), "low": math.log(lo / c), "close": math.log(c),
            "volume": math.log1p(v),
            "hour_sin": math.sin(2 * math.pi * hour / 24), "hour_cos": math.cos(2 * math.pi * hour / 24),
            "dow_sin": math.sin(2 * math.pi * when.weekday() / 7),
            "dow_cos": math.cos(2 * math.pi * when.weekday() / 7),
            "upper_shadow": (h - max(o, c)) / c, "lower_shadow": (min(o, c) - lo) / c,
            "close_mean_24": math.log(statistics.fmean(close[:24]) / c),
            "close_std_24": statistics.pstdev(close[:24]) / c,
            "volume_mean_24": math.log1p(statistics.fmean(volume[:24])),
            "volume_std_24": math.log1p(statistics.pstdev(volume[:24]))}  # fmt: skip
    out |= {f"return_{n}": c / close[n] - 1 for n in (2, 3, 4, 12, 24)}
    out["rsi_14"] = textbook_rsi(close[::-1])
    return out


PINNED = [
    (BTC_1H, 3600, "2024-03-05T14:00:00Z"),  # a Tuesday afternoon of a sharp sell-off
    (BTC_1H, 3600, "2025-06-15T07:00:00Z"),  # a quiet Sunday morning
    (BTC_1H, 3600, "2026-05-01T09:00:00Z"),  # a Friday, a week before the second real hole
    (DATASETS / "coinbase_ETH-USD_15m_2026-03_04.csv", 900, "2026-03-20T16:45:00Z"),  # 15-minute candles
]


@pytest.mark.parametrize(("path", "g", "at"), PINNED, ids=[f"{p.stem}@{at}" for p, _, at in PINNED])
def test_v1_columns_equal_a_plain_python_textbook_computation(path: Path, g: int, at: str) -> None:
    candles = read_csv(path)
    t = int(datetime.fromisoformat(at).timestamp())
    expected = textbook_features(candles, t, g)
    assert len(expected) == 69
    starts = sorted(s for s in candles if s <= t)
    s = CandleSeries(g, np.array(starts), *(np.array([candles[x][i] for x in starts], dtype=np.float64)
                                            for i in range(5)))  # fmt: skip
    for got in (feature_row(s), feature_matrix(s)[-1]):
        for name, value in expected.items():
            assert got[FEATURE_NAMES.index(name)] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize(("step", "rsi"), [(0.0, 50.0), (1.0, 100.0), (-1.0, 0.0), (2.0, 100.0)])
def test_rsi_at_its_textbook_limits(step: float, rsi: float) -> None:
    """Flat closes: 50; only gains: 100; only losses: 0 (RSI = 100 - 100 / (1 + gain / loss))."""
    close = np.asarray(1000.0 + step * np.arange(WINDOW), dtype=np.float64)
    high, low = np.asarray(close + 1, dtype=np.float64), np.asarray(close - 1, dtype=np.float64)
    s = CandleSeries(3600, 3600 * np.arange(WINDOW), close, high, low, close, np.ones(WINDOW))
    assert feature_row(s)[FEATURE_NAMES.index("rsi_14")] == rsi
    assert feature_matrix(s)[-1, FEATURE_NAMES.index("rsi_14")] == rsi


def test_serving_row_equals_training_matrix_on_real_data(btc_hourly: CandleSeries) -> None:
    X = feature_matrix(btc_hourly)
    checked = 0
    for i in range(WINDOW - 1, len(btc_hourly), 7):
        try:
            row = feature_row(upto(btc_hourly, i))
        except MissingHistory:
            assert np.isnan(X[i]).all(), f"row {i}: serving refused what training computed"
            continue
        np.testing.assert_allclose(row, X[i], rtol=0, atol=1e-9)
        checked += 1
    assert checked > 2500


def test_lags_are_taken_by_timestamp_across_a_real_hole(btc_hourly: CandleSeries) -> None:
    s = btc_hourly
    assert HOLE_FIRST - H in s.start
    assert HOLE_LAST + H in s.start
    assert not np.isin(np.arange(HOLE_FIRST, HOLE_LAST + 1, H), s.start).any()
    X = feature_matrix(s)
    close_at = dict(zip(s.start.tolist(), s.close.tolist(), strict=True))
    after = np.flatnonzero(s.start > HOLE_LAST)
    # Every candle whose 25-candle window touches the hole has no features ...
    for i in after[: WINDOW - 1]:
        assert np.isnan(X[i]).all()
        with pytest.raises(MissingHistory, match="missing"):
            feature_row(upto(s, i))
    # ... and the first complete one after it lags by time, not by row: lag k is the close k hours ago.
    first = after[WINDOW - 1]
    t = int(s.start[first])
    assert t == HOLE_LAST + WINDOW * H
    for k in range(1, 25):
        expected = np.log(close_at[t - k * H] / close_at[t])
        assert X[first, FEATURE_NAMES.index(f"close_lag_{k}")] == pytest.approx(expected, abs=1e-12)
    # The row just before the hole has no next candle (by timestamp), so no training target either.
    ds = build_dataset(s)
    assert HOLE_FIRST - H not in ds.start
    assert HOLE_FIRST - 2 * H in ds.start


def test_targets_are_the_next_candle_by_timestamp(btc_hourly: CandleSeries) -> None:
    ds = build_dataset(btc_hourly)
    close_at = dict(zip(btc_hourly.start.tolist(), btc_hourly.close.tolist(), strict=True))
    picks = np.linspace(0, len(ds) - 1, 50).astype(int)
    assert all(ds.target[i] == close_at[int(ds.start[i]) + H] for i in picks)
    assert np.isfinite(ds.X).all()


def test_realized_volatility_is_the_std_of_the_last_24_log_returns(btc_hourly: CandleSeries) -> None:
    i = 5000
    row = feature_row(upto(btc_hourly, i))
    closes = btc_hourly.close[i - 24 : i + 1]
    assert realized_volatility(row)[0] == pytest.approx(np.std(np.diff(np.log(closes))), rel=1e-9)


@pytest.mark.parametrize("starts", [[0, 1800], [0, 3600, 3600], [3600, 0], [0, 7200, 3600]])
def test_series_whose_starts_do_not_ascend_on_boundaries_are_refused(starts: list[int]) -> None:
    n = len(starts)
    with pytest.raises(ValueError, match=r"^candle starts must ascend on 3600s boundaries$"):
        CandleSeries(3600, np.array(starts), *(np.ones(n) for _ in range(5)))


@pytest.mark.parametrize("short", range(5))
def test_series_whose_columns_differ_in_length_are_refused(short: int) -> None:
    columns = [np.ones(3) for _ in range(5)]
    columns[short] = np.ones(2)
    with pytest.raises(ValueError, match=r"^candle columns differ in length$"):
        CandleSeries(3600, np.array([0, 3600, 7200]), *columns)


def test_too_short_series_have_no_features() -> None:
    with pytest.raises(MissingHistory, match=r"^need 25 candles, have 2$"):
        feature_row(CandleSeries(3600, np.array([0, 3600]), *(np.ones(2) for _ in range(5))))
    empty = CandleSeries(3600, np.array([], dtype=np.int64), *(np.ones(0) for _ in range(5)))
    assert feature_matrix(empty).shape == (0, N_FEATURES)


def test_serving_names_the_first_missing_candle(btc_hourly: CandleSeries) -> None:
    after = int(np.flatnonzero(btc_hourly.start > HOLE_LAST)[0])
    with pytest.raises(
        MissingHistory, match=rf"^5 candle\(s\) missing from the last 25, first at {HOLE_FIRST}$"
    ):
        feature_row(upto(btc_hourly, after + 3))


def test_series_are_frozen(btc_hourly: CandleSeries) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        btc_hourly.granularity = 900  # type: ignore[misc]
