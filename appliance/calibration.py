"""On-device calibration: a pooled model set's intervals fitted to the served product's own history.

A pooled version (registry product ``*``) serves products it never saw. Its point models and its
volatility model read scale-free features, so they carry over; how wide a product's intervals must
be, the multiplier q of the volatility model's sigma, does not, since each product's moves stand in
its own relation to what sigma foresees. So the appliance calibrates q here, the way training does
(split-conformal: the finite-sample-corrected quantile of |realized - predicted log return| / sigma),
on the product's newest ``CALIBRATION_DAYS`` of candles, every model through its served ONNX graph,
one row at a time as it serves.

Too little history (a product listed weeks ago) is refused with the reason, and the pooled set's own
quantiles (calibrated in training on the products it was trained on) serve meanwhile; every
prediction says which. Recalibrated once a market day, in a low-priority worker thread, never on the
event loop; kept in the store, so a restart reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from appliance.features import WINDOW, CandleSeries, feature_matrix, next_candle

Floats = NDArray[np.float64]
LEVELS = (0.8, 0.95)
#: Days of this product's own candles a calibration uses, and needs: enough that the intervals are
#: honest across the week's cycle and more than one mood of the market (720 hourly candles; at 15
#: minutes the same 30 days, 2,880 candles, rather than the same count over a week and a half).
CALIBRATION_DAYS = 30
DAY = 86_400
Method = Literal["training", "pooled", "device"]


def rows_needed(granularity: int) -> int:
    """Calibration rows (candles with features and a known next candle) a calibration takes."""
    return CALIBRATION_DAYS * DAY // granularity


def candles_needed(granularity: int) -> int:
    """Closed candles a calibration reads: its rows, the window before the first, the one after the last."""
    return rows_needed(granularity) + WINDOW


def conformal_quantile(scores: Floats, level: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) level)-th smallest score (the largest if n is small)."""
    z = np.sort(scores)
    n = len(z)
    return float(z[min(n - 1, math.ceil((n + 1) * level) - 1)])


def conformal_quantiles(scores: Floats) -> dict[str, float]:
    """Each level's quantile, keyed as manifests key them ("0.8", "0.95")."""
    return {str(level): conformal_quantile(scores, level) for level in LEVELS}


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


class NotEnoughHistory(ValueError):
    """Fewer calibration rows than an honest calibration needs."""


@dataclass(frozen=True)
class Fitted:
    """What a calibration found: per model and level the multiplier, and the rows it came from."""

    quantiles: dict[str, dict[str, float]]
    rows: int
    first: int
    last: int


Graph = Callable[[Floats], float]


def calibrate(series: CandleSeries, sigma: Graph, models: Mapping[str, Graph], rows: int) -> Fitted:
    """Split-conformal multipliers from the newest ``rows`` candles of ``series`` that have a full
    feature window and a next candle: each model's |realized - predicted log return| / sigma.

    ``sigma`` and ``models`` run one feature row (the served graphs: sigma, and each model's served log
    return, shrinkage included). NotEnoughHistory, naming what there is, when the rows fall short.
    """
    X = feature_matrix(series)
    nxt = next_candle(series)
    usable = np.flatnonzero((nxt >= 0) & np.isfinite(X).all(axis=1))
    if len(usable) < rows:
        days = len(usable) * series.granularity / DAY
        raise NotEnoughHistory(
            f"{len(usable)} candles of {series.granularity}s history to calibrate on ({days:.1f} days), "
            f"{rows} ({CALIBRATION_DAYS} days) needed"
        )
    picked = usable[-rows:]
    realized = np.log(series.close[nxt[picked]] / series.close[picked])
    scale = np.array([sigma(X[i]) for i in picked])
    quantiles = {
        name: conformal_quantiles(np.abs(realized - np.array([run(X[i]) for i in picked])) / scale)
        for name, run in models.items()
    }
    return Fitted(quantiles, rows, int(series.start[picked[0]]), int(series.start[picked[-1]]))
