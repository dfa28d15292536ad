"""Realized accuracy: how the predictions that came due did, beside persistence on the same hours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.metrics import COVERAGE_80, REALIZED_MAE
from appliance.store import PredictionRow, Store


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
    done = [r for r in rows if r.realized_close is not None]
    if not done:
        return Accuracy(model, 0, None, None, None, None, None)
    n = len(done)
    actual = [r.realized_close for r in done if r.realized_close is not None]
    mae = sum(abs(r.predicted_close - y) for r, y in zip(done, actual, strict=True)) / n
    base = sum(abs(r.last_close - y) for r, y in zip(done, actual, strict=True)) / n
    return Accuracy(
        model, n, mae, base, 1 - mae / base if base else None,
        sum(r.lower_80 <= y <= r.upper_80 for r, y in zip(done, actual, strict=True)) / n,
        sum(r.lower_95 <= y <= r.upper_95 for r, y in zip(done, actual, strict=True)) / n,
    )  # fmt: skip


def scores(store: Store, product: str, models: Sequence[str], window: int) -> list[Accuracy]:
    """Each model's accuracy over its newest ``window`` predictions."""
    return [accuracy(m, store.predictions(product, model=m, limit=window)) for m in models]


def publish(product: str, scores: Sequence[Accuracy]) -> None:
    for s in scores:
        if s.mae is not None:
            REALIZED_MAE.labels(product, s.model).set(s.mae)
            REALIZED_MAE.labels(product, "persistence").set(s.persistence_mae or 0.0)
            COVERAGE_80.labels(product, s.model).set(s.coverage_80 or 0.0)
