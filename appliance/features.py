"""Feature spec v2: what the models see, computed once for training and serving (numpy only).

Every feature of a candle t is known when candle t closes. Prices enter as log ratios to the current
close (and returns), so models learn shapes rather than price levels they may never have seen.

* ``close_lag_k`` (k = 1..24): log(close[t-k] / close[t]); ``volume_lag_k``: log1p(volume[t-k]).
* ``open``, ``high``, ``low``: log(x[t] / close[t]); ``close``: log(close[t]); ``volume``: log1p(volume[t]).
* ``hour_sin/cos``, ``dow_sin/cos``: hour of day and day of week (UTC) of the candle's open.
* ``upper_shadow``, ``lower_shadow``: wick lengths relative to the close.
* ``close_mean_24``, ``close_std_24``: mean (as a log ratio to close[t]) and std (relative to close[t])
  of the closes t-23..t; ``volume_mean_24``, ``volume_std_24``: log1p of the same for volume.
* ``return_n`` (n = 2, 3, 4, 12, 24): close[t] / close[t-n] - 1.
* ``rsi_14``: RSI over the last 14 close changes with simple averages, so it depends on a fixed
  window (Wilder's smoothing would depend on all history, and training and serving would disagree).

Spec v2 adds what the volatility model reads (the first 69 columns are v1's, by name and meaning):

* ``rv_n`` (n = 1, 6, 24, 168): log(mean of the last n squared one-candle log returns + 1e-8), the
  realized variance; the floor keeps a flat candle finite (about a 0.01 % move).
* ``gk_n``: log(mean Garman-Klass variance of the last n candles + 1e-8), the range-based estimator
  0.5 log(high/low)^2 - (2 log 2 - 1) log(close/open)^2, several times less noisy than a squared return.
* ``hour_of_week``: 0 (Monday 00:00 UTC) .. 167, as a number; the volatility model one-hot encodes it.

Lags are taken by **timestamp**, never by row: a candle missing from the window (Coinbase publishes
none for an interval without trades, and outages leave holes) makes the features of every candle
whose window (the 169 candles t-168..t that the longest span needs) contains the hole undefined.
Those rows are dropped in training and refused at serving time; nothing is forward-filled or invented.
Nothing here is fitted: scaling lives in the models, fitted on training data only.

The reference design's list, every item of it, enumerates to 69 columns (issue text: "68"); v2 has 78.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from appliance.candles import CandleRow

SPEC_NAME = "cryptopi-features-v2"
LAGS = 24
ROLLING = 24
RETURN_SPANS = (2, 3, 4, 12, 24)
RSI_PERIOD = 14
VOL_SPANS = (1, 6, 24, 168)
VAR_FLOOR = 1e-8
#: Candles a feature row needs: t-168 .. t (168 one-candle returns).
WINDOW = max(LAGS, *VOL_SPANS) + 1

FEATURE_NAMES: tuple[str, ...] = (
    *(f"close_lag_{k}" for k in range(1, LAGS + 1)),
    *(f"volume_lag_{k}" for k in range(1, LAGS + 1)),
    "open", "high", "low", "close", "volume",
    "hour_sin", "hour_cos", "dow_sin", "dow_cos",
    "upper_shadow", "lower_shadow",
    "close_mean_24", "close_std_24", "volume_mean_24", "volume_std_24",
    *(f"return_{n}" for n in RETURN_SPANS),
    "rsi_14",
    *(f"rv_{n}" for n in VOL_SPANS),
    *(f"gk_{n}" for n in VOL_SPANS),
    "hour_of_week",
)  # fmt: skip
N_FEATURES = len(FEATURE_NAMES)

Floats = NDArray[np.float64]


class MissingHistory(ValueError):
    """The candles needed for a feature row are not all there."""


@dataclass(frozen=True)
class CandleSeries:
    """Candles of one product and granularity, ascending by open time (epoch seconds)."""

    granularity: int
    start: NDArray[np.int64]
    open: Floats
    high: Floats
    low: Floats
    close: Floats
    volume: Floats

    def __post_init__(self) -> None:
        n = len(self.start)
        if any(len(a) != n for a in (self.open, self.high, self.low, self.close, self.volume)):
            raise ValueError("candle columns differ in length")
        if n and (np.any(np.diff(self.start) <= 0) or np.any(self.start % self.granularity)):
            raise ValueError(f"candle starts must ascend on {self.granularity}s boundaries")

    @classmethod
    def from_rows(cls, granularity: int, rows: Sequence[CandleRow]) -> CandleSeries:
        """From candle rows (the store's, a CSV file's), transposed in one pass: every close does this
        for each product and horizon."""
        start, *ohlcv = zip(*rows, strict=True) if rows else ((),) * 7
        prices = (np.array(c, dtype=np.float64) for c in ohlcv[:5])  # the trade counts are not features
        return cls(granularity, np.array(start, dtype=np.int64), *prices)

    def __len__(self) -> int:
        return len(self.start)

    def tail(self, n: int) -> CandleSeries:
        return CandleSeries(self.granularity, self.start[-n:], self.open[-n:], self.high[-n:],
                            self.low[-n:], self.close[-n:], self.volume[-n:])  # fmt: skip


def feature_matrix(s: CandleSeries) -> Floats:
    """Features of every candle (rows in the series' order); NaN rows where the window has a hole."""
    if len(s) == 0:
        return np.empty((0, N_FEATURES))
    g = s.granularity
    pos = (s.start - s.start[0]) // g
    grid_start = s.start[0] + np.arange(pos[-1] + 1) * g

    def dense(values: Floats) -> Floats:
        out = np.full(len(grid_start), np.nan)
        out[pos] = values
        return out

    def lag(values: Floats, k: int) -> Floats:
        out = np.full_like(values, np.nan)
        out[k:] = values[:-k]
        return out

    def trailing(values: Floats, width: int) -> NDArray[np.float64]:
        """Windows ending at each position (NaN-padded at the start): shape (n, width)."""
        out = np.full((len(values), width), np.nan)
        out[width - 1 :] = sliding_window_view(values, width)
        return out

    o, h, lo, c, v = (dense(a) for a in (s.open, s.high, s.low, s.close, s.volume))
    log_c = np.log(c)
    hour = (grid_start % 86_400) / 3600
    dow = (grid_start // 86_400 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    close_win, volume_win = trailing(c, ROLLING), trailing(v, ROLLING)
    change = c - lag(c, 1)
    gains = trailing(np.where(np.isnan(change), np.nan, np.maximum(change, 0.0)), RSI_PERIOD).mean(axis=1)
    losses = trailing(np.where(np.isnan(change), np.nan, np.maximum(-change, 0.0)), RSI_PERIOD).mean(axis=1)
    squared = (log_c - lag(log_c, 1)) ** 2
    gk = garman_klass(o, h, lo, c)
    columns = [
        *(lag(log_c, k) - log_c for k in range(1, LAGS + 1)),
        *(np.log1p(lag(v, k)) for k in range(1, LAGS + 1)),
        np.log(o) - log_c, np.log(h) - log_c, np.log(lo) - log_c, log_c, np.log1p(v),
        np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
        np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7),
        (h - np.maximum(o, c)) / c, (np.minimum(o, c) - lo) / c,
        np.log(close_win.mean(axis=1)) - log_c, close_win.std(axis=1) / c,
        np.log1p(volume_win.mean(axis=1)), np.log1p(volume_win.std(axis=1)),
        *(c / lag(c, n) - 1 for n in RETURN_SPANS),
        _rsi(gains, losses),
        *(np.log(trailing(squared, n).mean(axis=1) + VAR_FLOOR) for n in VOL_SPANS),
        *(np.log(trailing(gk, n).mean(axis=1) + VAR_FLOOR) for n in VOL_SPANS),
        ((grid_start // 3600 + 72) % 168).astype(np.float64),  # 1970-01-01 00:00 was Thursday, hour 72
    ]  # fmt: skip
    matrix: Floats = np.stack(columns, axis=1)
    # The window rule: any hole within a row's WINDOW candles leaves the whole row undefined.
    complete = ~np.isnan(trailing(c, WINDOW)).any(axis=1)
    matrix[~complete] = np.nan
    rows: Floats = matrix[pos]
    return rows


def feature_row(s: CandleSeries) -> Floats:
    """Features of the last candle of ``s``: the serving path, written independently of the above."""
    if len(s) < WINDOW:
        raise MissingHistory(f"need {WINDOW} candles, have {len(s)}")
    w = s.tail(WINDOW)
    g = s.granularity
    expected = w.start[-1] - g * np.arange(WINDOW - 1, -1, -1)
    if not np.array_equal(w.start, expected):
        missing = sorted(set(expected.tolist()) - set(w.start.tolist()))
        raise MissingHistory(
            f"{len(missing)} candle(s) missing from the last {WINDOW}, first at {missing[0]}"
        )
    close, volume = w.close, w.volume
    c, o, h, lo, v = close[-1], w.open[-1], w.high[-1], w.low[-1], volume[-1]
    t = int(w.start[-1])
    hour, dow = (t % 86_400) / 3600, (t // 86_400 + 3) % 7
    recent_c, recent_v = close[-ROLLING:], volume[-ROLLING:]
    changes = np.diff(close[-(RSI_PERIOD + 1) :])
    squared = np.diff(np.log(close)) ** 2  # one per candle but the first: WINDOW - 1 of them
    gk = garman_klass(w.open, w.high, w.low, close)
    row = [
        *(float(np.log(close[-1 - k] / c)) for k in range(1, LAGS + 1)),
        *(float(np.log1p(volume[-1 - k])) for k in range(1, LAGS + 1)),
        np.log(o / c), np.log(h / c), np.log(lo / c), np.log(c), np.log1p(v),
        np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
        np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7),
        (h - max(o, c)) / c, (min(o, c) - lo) / c,
        np.log(np.mean(recent_c) / c), np.std(recent_c) / c,
        np.log1p(np.mean(recent_v)), np.log1p(np.std(recent_v)),
        *(c / close[-1 - n] - 1 for n in RETURN_SPANS),
        float(_rsi(np.array([np.mean(np.clip(changes, 0, None))]),
                   np.array([np.mean(np.clip(-changes, 0, None))]))[0]),
        *(np.log(np.mean(squared[-n:]) + VAR_FLOOR) for n in VOL_SPANS),
        *(np.log(np.mean(gk[-n:]) + VAR_FLOOR) for n in VOL_SPANS),
        float((t // 3600 + 72) % 168),
    ]  # fmt: skip
    return np.asarray(row, dtype=np.float64)


def next_candle(s: CandleSeries) -> NDArray[np.int64]:
    """Each candle's next one by timestamp (t + granularity), as an index into ``s``; -1 where it is
    missing (a hole, or the newest candle): what a prediction made at t is scored against."""
    nxt = np.searchsorted(s.start, s.start + s.granularity)
    found = nxt < len(s)
    found[found] &= s.start[nxt[found]] == s.start[found] + s.granularity
    return np.where(found, nxt, -1).astype(np.int64)


def _rsi(avg_gain: Floats, avg_loss: Floats) -> Floats:
    with np.errstate(divide="ignore", invalid="ignore"):
        rsi = 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
    rsi = np.where(avg_loss == 0, np.where(avg_gain == 0, 50.0, 100.0), rsi)
    return np.where(np.isnan(avg_gain) | np.isnan(avg_loss), np.nan, rsi)


def garman_klass(o: Floats, h: Floats, lo: Floats, c: Floats) -> Floats:
    """Each candle's Garman-Klass variance; never negative, as |log(c/o)| <= log(h/lo)."""
    spread, body = np.log(h / lo), np.log(c / o)
    gk: Floats = 0.5 * spread**2 - (2 * np.log(2) - 1) * body**2
    return gk


def _spec_hash() -> str:
    """Content hash of the spec: names, parameters and the computing code (as AST: comments don't count)."""

    def code(fn: object) -> str:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))  # type: ignore[arg-type]
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str):  # fmt: skip
                body.pop(0)  # docstrings
        return ast.dump(tree)

    spec = {
        "name": SPEC_NAME, "features": FEATURE_NAMES, "lags": LAGS, "rolling": ROLLING,
        "returns": RETURN_SPANS, "rsi": RSI_PERIOD, "vol_spans": VOL_SPANS, "var_floor": VAR_FLOOR,
        "window": WINDOW, "code": [code(f) for f in (feature_matrix, feature_row, _rsi, garman_klass)],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


SPEC_HASH = _spec_hash()
