"""Honest evaluation: metrics against persistence, calibrated intervals, walk-forward folds.

Intervals are split-conformal on a volatility scale: |actual - predicted log return| divided by the
volatility model's sigma, its empirical quantile taken on calibration rows that come after the rows
the models (point and volatility) were fitted on and before the hold-out. They widen when the market
is wild and narrow when it is calm, which is where short-horizon forecasts have real skill. Two other
scales are calibrated the same way, for comparison only: a constant width, and the realized
volatility of the last 24 candles (what spec v1 served).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from appliance.calibration import LEVELS, conformal_quantiles
from appliance.features import FEATURE_NAMES
from training.data import Dataset
from training.models import Persistence, Predictor, VolatilityModel, fit_volatility

SCALES = ("volatility", "rv24", "constant")
Floats = NDArray[np.float64]
Metrics = dict[str, float | None]
_RV_24 = FEATURE_NAMES.index("rv_24")


@dataclass(frozen=True)
class Calibration:
    """Interval multipliers per scale and level; ``served`` is the volatility model's."""

    quantiles: dict[str, dict[str, float]]  # scale -> level ("0.8") -> multiplier

    @property
    def served(self) -> dict[str, float]:
        return self.quantiles["volatility"]


def scales(ds: Dataset, sigma: Floats) -> dict[str, Floats]:
    """Each scale's sigma per row: the volatility model's, the last 24 candles' RMS return, 1."""
    return {"volatility": sigma, "rv24": np.sqrt(np.exp(ds.X[:, _RV_24])), "constant": np.ones(len(ds))}


def calibrate(ds: Dataset, predicted: Floats, sigma: Floats) -> Calibration:
    """Multipliers that cover each level on ``ds`` (split-conformal, finite-sample corrected)."""
    error = np.abs(ds.log_return - predicted)
    if len(error) < 20:
        raise ValueError(f"{len(error)} calibration rows are too few for intervals")
    return Calibration({name: conformal_quantiles(error / s) for name, s in scales(ds, sigma).items()})


def bounds(ds: Dataset, predicted: Floats, spread: Floats) -> tuple[Floats, Floats]:
    """Price interval from log-return +- ``spread`` (multiplier x sigma)."""
    return ds.close * np.exp(predicted - spread), ds.close * np.exp(predicted + spread)


def diebold_mariano(loss: Floats, base: Floats) -> tuple[float, float] | None:
    """One-sided Diebold-Mariano test of "``loss`` is larger than ``base`` on average": the
    statistic (mean loss differential over its HAC / Newey-West standard error, Bartlett kernel,
    lags by Newey and West's 1994 rule) and its p-value. None when the forecasts are identical."""
    from scipy.stats import norm
    from statsmodels.regression.linear_model import OLS

    d = loss - base
    if not np.any(d):
        return None
    lags = int(4 * (len(d) / 100) ** (2 / 9))
    fit = OLS(d, np.ones(len(d))).fit(cov_type="HAC", cov_kwds={"maxlags": lags})
    stat = float(fit.tvalues[0])
    return stat, float(norm.sf(stat))


def evaluate(ds: Dataset, predicted: Floats, sigma: Floats, cal: Calibration) -> Metrics:
    """Price-space metrics of predicted log returns on ``ds``, beside persistence on the same rows."""
    price = ds.close * np.exp(predicted)
    error = price - ds.target
    mae = float(np.mean(np.abs(error)))
    persistence_error = np.abs(ds.close - ds.target)
    moved = ds.target != ds.close
    predicted_move = np.sign(price - ds.close)
    dm = diebold_mariano(np.abs(error), persistence_error)
    out: Metrics = {
        "rows": float(len(ds)),
        "mae": mae,
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mape_pct": float(np.mean(np.abs(error) / ds.target) * 100),
        "skill_vs_persistence": 1 - mae / float(np.mean(persistence_error)),
        # Share of moves called in the right direction; undefined for a model that never moves.
        "directional_accuracy": (
            float(np.mean(predicted_move[moved] == np.sign(ds.target - ds.close)[moved]))
            if np.any(predicted_move != 0) else None
        ),
        # One-sided Diebold-Mariano on absolute error: a small p means worse than persistence.
        "dm_stat": dm[0] if dm else None,
        "dm_p": dm[1] if dm else None,
    }  # fmt: skip
    sigmas = scales(ds, sigma)
    tercile = np.searchsorted(np.quantile(sigma, [1 / 3, 2 / 3]), sigma)  # 0 calm .. 2 wild
    for level in LEVELS:
        tag, key = f"{round(level * 100)}", str(level)
        score = {}
        for name, s in sigmas.items():
            lo, hi = bounds(ds, predicted, cal.quantiles[name][key] * s)
            score[name] = _interval_score(ds.target, lo, hi, level)
            if name == "volatility":
                inside = (ds.target >= lo) & (ds.target <= hi)
                out[f"coverage_{tag}"] = float(np.mean(inside))
                for t in range(3):
                    out[f"coverage_{tag}_tercile_{t + 1}"] = float(np.mean(inside[tercile == t]))
                out[f"width_{tag}"] = float(np.mean(hi - lo))
                out[f"interval_score_{tag}"] = score[name]
        # How much adapting to volatility is worth: the score saved against a constant width.
        out[f"interval_skill_{tag}"] = 1 - score["volatility"] / score["constant"]
        out[f"rv24_interval_skill_{tag}"] = 1 - score["rv24"] / score["constant"]
    return out


def _interval_score(y: Floats, lo: Floats, hi: Floats, level: float) -> float:
    """Gneiting & Raftery's interval score: width plus 2/alpha times each miss. Lower is better."""
    miss = np.maximum(lo - y, 0) + np.maximum(y - hi, 0)
    return float(np.mean(hi - lo + 2 / (1 - level) * miss))


SHRINK_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def choose_shrink(close: Floats, target: Floats, predicted: Floats, p: float = 0.05) -> float:
    """The shrink factor toward persistence, from out-of-sample predictions of the training period.

    The factor of ``SHRINK_GRID`` with the lowest price MAE (the smallest on a tie), kept only if the
    model so shrunk is significantly better than persistence there (one-sided Diebold-Mariano,
    p < ``p``, the gate's level); otherwise 0, which serves persistence itself. Without evidence of
    skill, any factor above 0 only bets on the sign of a correlation the data cannot tell from zero,
    and the gate's test on unseen data would fail as often as it passes.
    """
    base = np.abs(close - target)
    errors = [np.abs(close * np.exp(f * predicted) - target) for f in SHRINK_GRID]
    best = int(np.argmin([np.mean(e) for e in errors]))
    better = diebold_mariano(base, errors[best])  # "persistence is worse than the shrunk model"
    return float(SHRINK_GRID[best]) if better is not None and better[1] < p else 0.0


FitFn = Callable[[Dataset], Predictor]


@dataclass(frozen=True)
class WalkForward:
    """Mean scores over the folds (the learned models as fitted, before any shrinkage), and every
    model's out-of-sample predictions over all blocks, in order (``rows``), to choose shrinkage on."""

    scores: dict[str, Metrics]
    rows: Dataset
    predicted: dict[str, Floats]


def walk_forward(
    train: Dataset,
    fitters: Mapping[str, FitFn],
    folds: int = 3,
    calib_fraction: float = 0.15,
    columns: Sequence[str] = FEATURE_NAMES,
) -> WalkForward:
    """Rolling-origin evaluation inside the training period: fit on the past, test on the next block.

    The last half of the period is cut into ``folds`` blocks; each fold fits the point models and
    the volatility model (on ``columns``) on everything before its block but the tail, calibrates the
    intervals on that tail, then is scored on the block.
    """
    blocks = np.array_split(np.arange(len(train) // 2, len(train)), folds)
    scores: dict[str, list[Metrics]] = {name: [] for name in ["persistence", *fitters]}
    predicted: dict[str, list[Floats]] = {name: [] for name in scores}
    index = np.arange(len(train))
    for block in blocks:
        past = train.take(index < block[0])
        test = train.take((index >= block[0]) & (index <= block[-1]))
        fit_part, calib_part = past.tail_fraction(calib_fraction)
        vol: VolatilityModel = fit_volatility(fit_part.X, fit_part.next_gk, columns=columns)
        models: dict[str, Predictor] = {"persistence": Persistence()}
        models |= {name: fit(fit_part) for name, fit in fitters.items()}
        for name, model in models.items():
            cal = calibrate(calib_part, model.predict(calib_part.X), vol.sigma(calib_part.X))
            predicted[name].append(model.predict(test.X))
            scores[name].append(evaluate(test, predicted[name][-1], vol.sigma(test.X), cal))
    summary: dict[str, Metrics] = {}
    for name, runs in scores.items():
        summary[name] = {"folds": float(len(runs))}
        for key in (k for k in runs[0] if k != "rows"):
            values = [r[key] for r in runs]
            summary[name][key] = (
                None if None in values else float(np.mean([v for v in values if v is not None]))
            )
    rows = train.take(index >= blocks[0][0])
    return WalkForward(summary, rows, {name: np.concatenate(p) for name, p in predicted.items()})


@dataclass
class Scored:
    """Served models (persistence, the learned ones shrunk) with the volatility model, their
    calibrations, and their hold-out and walk-forward scores."""

    models: dict[str, Predictor]
    volatility: VolatilityModel
    calibration: dict[str, Calibration]
    holdout: dict[str, Metrics]
    walk_forward: dict[str, Metrics]
    train: Dataset
    calib: Dataset  # the tail of ``train`` that calibrates the intervals (nothing is fitted on it)
    test: Dataset
    seconds: dict[str, float]
    #: A pooled set's hold-out per product, in that product's own prices (``test`` is in relative
    #: units), and each product's scores there; empty for one product's version.
    tests: dict[str, Dataset] = field(default_factory=dict)
    by_product: dict[str, dict[str, Metrics]] = field(default_factory=dict)
