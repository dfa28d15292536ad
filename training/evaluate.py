"""Honest evaluation: metrics against persistence, calibrated intervals, walk-forward folds.

Intervals are split-conformal on a volatility scale: |actual - predicted log return| divided by the
realized volatility of the last 24 candles, its empirical quantile taken on calibration rows that
come after the rows the model was fitted on and before the hold-out. They widen when the market is
wild and narrow when it is calm, which is where short-horizon forecasts have real skill.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from appliance.features import realized_volatility
from training.data import Dataset
from training.models import Persistence, Predictor

LEVELS = (0.8, 0.95)
Floats = NDArray[np.float64]
Metrics = dict[str, float | None]


@dataclass(frozen=True)
class Calibration:
    """Interval multipliers per level: of the realized volatility (served) and, for comparison only,
    of nothing (a constant-width interval in log-return terms)."""

    scaled: dict[str, float]
    fixed: dict[str, float]


def calibrate(ds: Dataset, predicted: Floats) -> Calibration:
    """Multipliers that cover each level on ``ds`` (split-conformal, finite-sample corrected)."""
    error = np.abs(ds.log_return - predicted)
    n = len(error)
    if n < 20:
        raise ValueError(f"{n} calibration rows are too few for intervals")

    def quantiles(z: Floats) -> dict[str, float]:
        z = np.sort(z)
        return {str(level): float(z[min(n - 1, math.ceil((n + 1) * level) - 1)]) for level in LEVELS}

    return Calibration(quantiles(error / realized_volatility(ds.X)), quantiles(error))


def bounds(ds: Dataset, predicted: Floats, multiplier: float) -> tuple[Floats, Floats]:
    spread = multiplier * realized_volatility(ds.X)
    return ds.close * np.exp(predicted - spread), ds.close * np.exp(predicted + spread)


def evaluate(ds: Dataset, predicted: Floats, cal: Calibration) -> Metrics:
    """Price-space metrics of predicted log returns on ``ds``, beside persistence's MAE."""
    price = ds.close * np.exp(predicted)
    error = price - ds.target
    mae = float(np.mean(np.abs(error)))
    persistence_mae = float(np.mean(np.abs(ds.close - ds.target)))
    moved = ds.target != ds.close
    predicted_move = np.sign(price - ds.close)
    out: Metrics = {
        "rows": float(len(ds)),
        "mae": mae,
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mape_pct": float(np.mean(np.abs(error) / ds.target) * 100),
        "skill_vs_persistence": 1 - mae / persistence_mae,
        # Share of moves called in the right direction; undefined for a model that never moves.
        "directional_accuracy": (
            float(np.mean(predicted_move[moved] == np.sign(ds.target - ds.close)[moved]))
            if np.any(predicted_move != 0) else None
        ),
    }  # fmt: skip
    for level, multiplier in cal.scaled.items():
        tag = f"{round(float(level) * 100)}"
        lo, hi = bounds(ds, predicted, multiplier)
        out[f"coverage_{tag}"] = float(np.mean((ds.target >= lo) & (ds.target <= hi)))
        out[f"width_{tag}"] = float(np.mean(hi - lo))
        out[f"interval_score_{tag}"] = _interval_score(ds.target, lo, hi, float(level))
        # The same level with a constant width: how much adapting to volatility is worth.
        spread = cal.fixed[level]
        constant = _interval_score(ds.target, ds.close * np.exp(predicted - spread),
                                   ds.close * np.exp(predicted + spread), float(level))  # fmt: skip
        out[f"interval_skill_{tag}"] = 1 - out[f"interval_score_{tag}"] / constant  # type: ignore[operator]
    return out


def _interval_score(y: Floats, lo: Floats, hi: Floats, level: float) -> float:
    """Gneiting & Raftery's interval score: width plus 2/alpha times each miss. Lower is better."""
    miss = np.maximum(lo - y, 0) + np.maximum(y - hi, 0)
    return float(np.mean(hi - lo + 2 / (1 - level) * miss))


FitFn = Callable[[Dataset], Predictor]


def walk_forward(
    train: Dataset, fitters: Mapping[str, FitFn], folds: int = 3, calib_fraction: float = 0.15
) -> dict[str, Metrics]:
    """Rolling-origin evaluation inside the training period: fit on the past, test on the next block.

    The last half of the period is cut into ``folds`` blocks; each fold fits on everything before
    its block (calibrating intervals on the tail of that), then is scored on the block.
    """
    blocks = np.array_split(np.arange(len(train) // 2, len(train)), folds)
    scores: dict[str, list[Metrics]] = {name: [] for name in ["persistence", *fitters]}
    index = np.arange(len(train))
    for block in blocks:
        past = train.take(index < block[0])
        test = train.take((index >= block[0]) & (index <= block[-1]))
        fit_part, calib_part = past.tail_fraction(calib_fraction)
        models: dict[str, Predictor] = {"persistence": Persistence()}
        models |= {name: fit(fit_part) for name, fit in fitters.items()}
        for name, model in models.items():
            cal = calibrate(calib_part, model.predict(calib_part.X))
            scores[name].append(evaluate(test, model.predict(test.X), cal))
    summary: dict[str, Metrics] = {}
    for name, runs in scores.items():
        summary[name] = {"folds": float(len(runs))}
        for key in (k for k in runs[0] if k != "rows"):
            values = [r[key] for r in runs]
            summary[name][key] = (
                None if None in values else float(np.mean([v for v in values if v is not None]))
            )
    return summary
