"""Predictions, calibrations and accuracy as values (pure: no store, no metrics)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Method = Literal["training", "pooled", "device"]


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
    #: How the intervals were calibrated: "training" (the version's own, for its product), "device" (a
    #: pooled version's, from this product's history here, at ``calibrated_at``), or "pooled" (the
    #: pooled version's, and ``calibration_note`` says why).
    calibration: Method = "training"
    calibrated_at: float | None = None
    calibration_note: str | None = None


@dataclass(frozen=True)
class Calibration:
    """How a product's intervals at one horizon are calibrated, as /health, the API and MQTT tell it.

    ``method``: "training" (the product's own version, calibrated on its training period), "device"
    (a pooled version, calibrated here from this product's history: ``quantiles``), or "pooled" (a
    pooled version with the quantiles of its training products, and ``reason`` says why).
    """

    product: str
    granularity: int
    version: str
    method: Method
    calibrated_at: float | None = None  # wall clock of the calibration (or of the refusal)
    through: int | None = None  # market time: close of the newest candle it read
    rows: int = 0  # this product's calibration rows (candles predicted and scored)
    first: int | None = None  # open time of the first and last of those candles
    last: int | None = None
    quantiles: Mapping[str, Mapping[str, float]] | None = None  # model -> level -> q ("device" only)
    reason: str | None = None  # why "pooled": history too short, or not calibrated yet


@dataclass(frozen=True)
class Accuracy:
    """How one model's predictions that came due scored (None: none has yet)."""

    model: str
    predictions: int
    mae: float | None
    persistence_mae: float | None  # "next close = last close" on the same hours
    skill: float | None  # 1 - mae / persistence_mae
    coverage_80: float | None
    coverage_95: float | None
