"""Feature spec v2 on real data: serving equals training, lags follow timestamps across real holes."""

from datetime import UTC, datetime

import numpy as np
import pytest

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
    assert len(SPEC_HASH) == 64


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


def test_bad_series_are_refused() -> None:
    with pytest.raises(ValueError, match="boundaries"):
        CandleSeries(3600, np.array([0, 1800]), *(np.ones(2) for _ in range(5)))
    with pytest.raises(MissingHistory, match="need 169"):
        feature_row(CandleSeries(3600, np.array([0, 3600]), *(np.ones(2) for _ in range(5))))
