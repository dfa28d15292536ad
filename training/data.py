"""Datasets from real candles: a candle CSV or the appliance's SQLite store, split by time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from appliance.candle_csv import read_candle_csv
from appliance.features import CandleSeries, feature_matrix, garman_klass, next_candle
from appliance.store import Store


def load_candles(path: Path, product: str, granularity: int) -> CandleSeries:
    """Candles from ``time,open,...`` CSV or from a cryptopi SQLite file (history, then trade candles)."""
    if path.suffix == ".csv":
        rows = [c.row() for c in read_candle_csv(path, granularity)]
    else:
        with Store(path, readonly=True) as store:
            rows = store.series_rows(product, granularity)
    if not rows:
        raise ValueError(f"{path}: no {product} candles at {granularity}s")
    return CandleSeries.from_rows(granularity, rows)


@dataclass(frozen=True)
class Dataset:
    """One row per candle t with complete features and a known next candle (of one product, or of
    several pooled: see :func:`pool`)."""

    granularity: int
    start: NDArray[np.int64]  # open time of candle t
    X: NDArray[np.float64]
    close: NDArray[np.float64]  # close of t: what the prediction starts from
    target: NDArray[np.float64]  # close of t+1
    next_gk: NDArray[np.float64]  # Garman-Klass variance of candle t+1: the volatility model's target
    product: NDArray[np.str_]  # whose candle t is

    @property
    def log_return(self) -> NDArray[np.float64]:
        return np.asarray(np.log(self.target / self.close))

    def __len__(self) -> int:
        return len(self.start)

    def take(self, mask: NDArray[np.bool_] | NDArray[np.int64]) -> Dataset:
        return Dataset(self.granularity, self.start[mask], self.X[mask], self.close[mask], self.target[mask],
                       self.next_gk[mask], self.product[mask])  # fmt: skip

    def split_at(self, when: int) -> tuple[Dataset, Dataset]:
        """Rows whose *target* candle opens before ``when`` (training side), and the rest."""
        before = self.start + self.granularity < when
        return self.take(before), self.take(~before)

    def tail_fraction(self, fraction: float) -> tuple[Dataset, Dataset]:
        """Chronological split: the first (1 - fraction) of rows and the last ``fraction``."""
        cut = round(len(self) * (1 - fraction))
        index = np.arange(len(self))
        return self.take(index < cut), self.take(index >= cut)

    def relative(self) -> Dataset:
        """The same rows priced in units of each row's own last close (close 1, target = the ratio):
        what a pooled set is scored in, since a dollar of BTC's error and a dollar of DOGE's are not
        comparable. Features, log returns and volatility targets are unchanged."""
        return replace(self, close=np.ones(len(self)), target=self.target / self.close)


def pool(parts: Sequence[Dataset]) -> Dataset:
    """Several products' rows as one dataset in time order (ties by product, as given), so every
    chronological split (hold-out, calibration tail, walk-forward blocks, time-series cross-validation)
    stays chronological across products."""
    if len({p.granularity for p in parts}) != 1:
        raise ValueError("pooled datasets must share one granularity")
    if len(parts) == 1:
        return parts[0]
    order = np.argsort(np.concatenate([p.start for p in parts]), kind="stable")
    joined = Dataset(parts[0].granularity,
                     *(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("start", "X", "close", "target", "next_gk", "product")))  # fmt: skip
    return joined.take(order)


def build_dataset(series: CandleSeries, product: str = "") -> Dataset:
    X = feature_matrix(series)
    nxt = next_candle(
        series
    )  # the next candle by timestamp (t + g), not the next row: a hole means no target
    has_next = nxt >= 0
    target, next_gk = np.full(len(series), np.nan), np.full(len(series), np.nan)
    i = nxt[has_next]
    target[has_next] = series.close[i]
    next_gk[has_next] = garman_klass(series.open[i], series.high[i], series.low[i], series.close[i])
    keep = has_next & np.isfinite(X).all(axis=1)
    return Dataset(series.granularity, series.start[keep], X[keep], series.close[keep], target[keep],
                   next_gk[keep], np.full(int(keep.sum()), product))  # fmt: skip


def iso(epoch_s: int | np.integer) -> datetime:
    return datetime.fromtimestamp(int(epoch_s), UTC)
