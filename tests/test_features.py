"""Feature spec v1 on real data: serving equals training, lags follow timestamps across real holes."""

from datetime import UTC, datetime

import numpy as np
import pytest

from appliance.features import (
    FEATURE_NAMES,
    N_FEATURES,
    SPEC_HASH,
    WINDOW,
    CandleSeries,
    MissingHistory,
    feature_matrix,
    feature_row,
    realized_volatility,
)
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
    assert len(SPEC_HASH) == 64


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


def test_bad_series_are_refused() -> None:
    with pytest.raises(ValueError, match="boundaries"):
        CandleSeries(3600, np.array([0, 1800]), *(np.ones(2) for _ in range(5)))
    with pytest.raises(MissingHistory, match="need 25"):
        feature_row(CandleSeries(3600, np.array([0, 3600]), *(np.ones(2) for _ in range(5))))
