"""Predictions as values, and how the ones that came due scored (pure: no store, no metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PredictionRow:
    """One model's prediction of the close of the candle after ``as_of`` (all times epoch seconds)."""

    product: str
    model: str
    as_of: int  # close time of the candle the prediction starts from
    model_version: str
    granularity: int
    target_time: int  # close time of the predicted candle
    last_close: float
    predicted_close: float
    lower_80: float
    upper_80: float
    lower_95: float
    upper_95: float
    created_at: float
    realized_close: float | None = None


@dataclass(frozen=True)
class Accuracy:
    model: str
    predictions: int
    mae: float | None
    persistence_mae: float | None  # "next close = last close" on the same hours
    skill: float | None  # 1 - mae / persistence_mae
    coverage_80: float | None
    coverage_95: float | None


def accuracy(model: str, rows: Sequence[PredictionRow]) -> Accuracy:
    """Scores of the realized rows among ``rows`` (others are still waiting for their candle)."""
    done = [(r, r.realized_close) for r in rows if r.realized_close is not None]
    if not done:
        return Accuracy(model, 0, None, None, None, None, None)
    n = len(done)
    mae = sum(abs(r.predicted_close - y) for r, y in done) / n
    base = sum(abs(r.last_close - y) for r, y in done) / n
    return Accuracy(
        model, n, mae, base, 1 - mae / base if base else None,
        sum(r.lower_80 <= y <= r.upper_80 for r, y in done) / n,
        sum(r.lower_95 <= y <= r.upper_95 for r, y in done) / n,
    )  # fmt: skip
