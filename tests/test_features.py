"""Feature spec v2 on real data: pinned against a plain-Python textbook computation, serving equals
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
    VAR_FLOOR,
    VOL_SPANS,
    WINDOW,
    CandleSeries,
    MissingHistory,
    feature_matrix,
    feature_row,
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


def holes(s: CandleSeries) -> np.ndarray:
    """Indexes of the first candle after each real hole."""
    return np.flatnonzero(np.diff(s.start) > s.granularity) + 1


def test_spec_v2_keeps_v1_columns_and_adds_volatility_and_seasonality() -> None:
    assert SPEC_NAME == "cryptopi-features-v2"
    assert len(set(FEATURE_NAMES)) == N_FEATURES == 78
    assert FEATURE_NAMES[:3] == ("close_lag_1", "close_lag_2", "close_lag_3")
    assert FEATURE_NAMES[68] == "rsi_14"  # v1's 69 columns first, as they were
    assert FEATURE_NAMES[69:] == (*(f"rv_{n}" for n in VOL_SPANS), *(f"gk_{n}" for n in VOL_SPANS),
                                  "hour_of_week")  # fmt: skip
    assert WINDOW == 169


def test_spec_hash_is_the_one_the_shipped_models_recorded() -> None:
    # The shipped models recorded the spec they were trained on: this build computes the same one.
    specs = [
        json.loads(m.read_text())["feature_spec"]
        for m in (REPO / "appliance" / "models").glob("*/manifest.json")
    ]
    recorded = {spec["hash"]: spec["name"] for spec in specs}
    assert recorded.get(SPEC_HASH) == SPEC_NAME
    assert features._spec_hash() == SPEC_HASH


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("LAGS", 23), ("ROLLING", 12), ("RETURN_SPANS", (2, 3)), ("RSI_PERIOD", 7), ("SPEC_NAME", "other"),
     ("VOL_SPANS", (1, 6, 24)), ("VAR_FLOOR", 1e-9)],
)  # fmt: skip
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
    """Every column of the candle opening at ``t``, one by one in plain Python, by name."""
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
    # Realized variance of the last n one-candle log returns, Garman-Klass variance of the last n candles.
    past = [candles[t - k * g] for k in range(169)]  # past[k]: the candle k candles ago
    for n in (1, 6, 24, 168):
        moves = [math.log(past[k][3] / past[k + 1][3]) ** 2 for k in range(n)]
        out[f"rv_{n}"] = math.log(sum(moves) / n + 1e-8)
        gk = [0.5 * math.log(hi / low) ** 2 - (2 * math.log(2) - 1) * math.log(cl / op) ** 2
              for op, hi, low, cl, _ in past[:n]]  # fmt: skip
        out[f"gk_{n}"] = math.log(sum(gk) / n + 1e-8)
    out["hour_of_week"] = when.weekday() * 24 + when.hour
    return out


PINNED = [
    (BTC_1H, 3600, "2024-03-05T14:00:00Z"),  # a Tuesday afternoon of a sharp sell-off
    (BTC_1H, 3600, "2025-06-15T07:00:00Z"),  # a quiet Sunday morning
    (BTC_1H, 3600, "2026-05-01T09:00:00Z"),  # a Friday, a week before the second real hole
    (DATASETS / "coinbase_ETH-USD_15m.csv", 900, "2026-03-20T16:45:00Z"),  # 15-minute candles
]


@pytest.mark.parametrize(("path", "g", "at"), PINNED, ids=[f"{p.stem}@{at}" for p, _, at in PINNED])
def test_columns_equal_a_plain_python_textbook_computation(path: Path, g: int, at: str) -> None:
    candles = read_csv(path)
    t = int(datetime.fromisoformat(at).timestamp())
    expected = textbook_features(candles, t, g)
    assert set(expected) == set(FEATURE_NAMES)
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


@pytest.mark.parametrize("series", ["btc_hourly", "btc_15m"])
def test_serving_row_equals_training_matrix_on_real_data(series: str, request: pytest.FixtureRequest) -> None:
    s: CandleSeries = request.getfixturevalue(series)
    X = feature_matrix(s)
    # A sample of the whole series, plus every row within a window after each real hole.
    near_holes = [i for h in holes(s) for i in range(h - 2, min(len(s), h + WINDOW + 2))]
    picks = sorted(set(range(WINDOW - 1, len(s), 29)) | set(near_holes))
    checked = refused = 0
    for i in picks:
        try:
            row = feature_row(upto(s, i))
        except MissingHistory:
            assert np.isnan(X[i]).all(), f"row {i}: serving refused what training computed"
            refused += 1
            continue
        assert np.isfinite(X[i]).all(), f"row {i}: serving computed what training refused"
        np.testing.assert_allclose(row, X[i], rtol=0, atol=1e-9)
        checked += 1
    assert checked > 600
    assert refused >= WINDOW - 1  # the rows whose window touches a hole, at least one whole window


def test_lags_are_taken_by_timestamp_across_a_real_hole(btc_hourly: CandleSeries) -> None:
    s = btc_hourly
    assert HOLE_FIRST - H in s.start
    assert HOLE_LAST + H in s.start
    assert not np.isin(np.arange(HOLE_FIRST, HOLE_LAST + 1, H), s.start).any()
    X = feature_matrix(s)
    close_at = dict(zip(s.start.tolist(), s.close.tolist(), strict=True))
    after = np.flatnonzero(s.start > HOLE_LAST)
    # Every candle whose 169-candle window touches the hole has no features ...
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
    assert (ds.next_gk >= 0).all()


def test_volatility_columns_are_what_they_say(btc_hourly: CandleSeries) -> None:
    i = 5000
    row = feature_row(upto(btc_hourly, i))
    s = btc_hourly
    for n in VOL_SPANS:
        returns = np.diff(np.log(s.close[i - n : i + 1]))
        assert row[FEATURE_NAMES.index(f"rv_{n}")] == pytest.approx(np.log(np.mean(returns**2) + VAR_FLOOR))
        o, h, lo, c = (a[i - n + 1 : i + 1] for a in (s.open, s.high, s.low, s.close))
        gk = 0.5 * np.log(h / lo) ** 2 - (2 * np.log(2) - 1) * np.log(c / o) ** 2
        assert row[FEATURE_NAMES.index(f"gk_{n}")] == pytest.approx(np.log(np.mean(gk) + VAR_FLOOR))
    when = datetime.fromtimestamp(int(s.start[i]), UTC)
    assert row[FEATURE_NAMES.index("hour_of_week")] == when.weekday() * 24 + when.hour


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
    with pytest.raises(MissingHistory, match=r"^need 169 candles, have 2$"):
        feature_row(CandleSeries(3600, np.array([0, 3600]), *(np.ones(2) for _ in range(5))))
    empty = CandleSeries(3600, np.array([], dtype=np.int64), *(np.ones(0) for _ in range(5)))
    assert feature_matrix(empty).shape == (0, N_FEATURES)


def test_serving_names_the_first_missing_candle(btc_hourly: CandleSeries) -> None:
    after = int(np.flatnonzero(btc_hourly.start > HOLE_LAST)[0])
    with pytest.raises(
        MissingHistory, match=rf"^5 candle\(s\) missing from the last 169, first at {HOLE_FIRST}$"
    ):
        feature_row(upto(btc_hourly, after + 3))


def test_series_are_frozen(btc_hourly: CandleSeries) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        btc_hourly.granularity = 900  # type: ignore[misc]
