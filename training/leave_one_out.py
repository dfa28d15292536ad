"""Leave-one-out: what a pooled set is worth on a product it never saw, calibrated as the appliance would.

For each product of the pool: a pooled set trained on the others (the one pipeline: ``fit_and_score``
and ``register``, into a scratch registry), loaded as the appliance loads it, its intervals calibrated
from that product's own candles before the hold-out by the appliance's own code
(:func:`appliance.calibration.calibrate`), then scored on the product's hold-out through the served
graphs, one row at a time. Beside it: the same set with its pooled quantiles (the product's history
unused), and the product's own version from a registry (trained on the product itself).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from appliance.calibration import calibrate, rows_needed
from appliance.features import CandleSeries
from appliance.inference import ProductModels, load_models
from appliance.registry import latest
from training.card import table
from training.data import Dataset, build_dataset, iso, load_candles
from training.evaluate import Calibration, Metrics, evaluate
from training.evaluate import calibrate as calibrate_scales
from training.pipeline import TrainConfig, fit_and_score, register

log = logging.getLogger(__name__)
Floats = np.ndarray


def leave_one_out(base: TrainConfig, own: Path) -> dict[str, Any]:
    """``base.pool``'s products left out in turn; ``own``: the registry of their own versions."""
    results: dict[str, Any] = {}
    for product, path in base.pool:
        cfg = replace(base, pool=tuple(x for x in base.pool if x[0] != product))
        log.info("leave one out", extra={"left_out": product, "trained_on": ",".join(p for p, _ in cfg.pool)})
        scored = fit_and_score(cfg)
        with tempfile.TemporaryDirectory() as scratch:
            registered = register(cfg, scored, Path(scratch), force=True)
            served = load_models(registered.folder)
            result = transfer(
                served, load_candles(path, product, base.granularity), product, base.holdout_start
            )
        result["trained_on"] = [p for p, _ in cfg.pool]
        result["pooled_version"] = registered.manifest.version
        mine = latest(own, product, base.granularity)
        if mine is not None:
            result["own"] = {"version": mine.version,
                             "models": {n: e.metrics["holdout"] for n, e in mine.models.items()}}  # fmt: skip
        results[product] = result
    return results


def transfer(served: ProductModels, series: CandleSeries, product: str, holdout_start: int) -> dict[str, Any]:
    """``served`` (a pooled set) on ``product``: calibrated on the device's way from the candles before
    ``holdout_start``, and with its pooled quantiles; both scored on the hold-out."""
    g = series.granularity
    before = int(np.searchsorted(series.start, holdout_start))
    history = CandleSeries(g, *(getattr(series, f)[:before] for f in ("start", "open", "high", "low", "close",
                                                                        "volume")))  # fmt: skip
    models = {name: m.log_return for name, m in served.models.items()}
    fitted = calibrate(history, served.sigma, models, rows_needed(g))  # what the appliance computes
    ds = build_dataset(series, product)
    calib = ds.take((ds.start >= fitted.first) & (ds.start <= fitted.last))
    if len(calib) != fitted.rows:
        raise AssertionError(f"{len(calib)} calibration rows here, {fitted.rows} on the device's side")
    test = ds.split_at(holdout_start)[1]
    (calib_sigma, calib_r), (test_sigma, test_r) = run(served, calib), run(served, test)
    device: dict[str, Metrics] = {}
    pooled: dict[str, Metrics] = {}
    for name, entry in served.models.items():
        # The three scales (the volatility model's, the last day's realized volatility, a constant
        # width) calibrated on the device's rows: the first is exactly what the device serves.
        scales = calibrate_scales(calib, calib_r[name], calib_sigma)
        if scales.served != fitted.quantiles[name]:
            raise AssertionError(f"{name}: {scales.served} here, {fitted.quantiles[name]} on the device")
        device[name] = evaluate(test, test_r[name], test_sigma, scales)
        # The pooled quantiles instead, against the same constant-width reference.
        kept = Calibration(scales.quantiles | {"volatility": dict(entry.quantiles)})
        pooled[name] = evaluate(test, test_r[name], test_sigma, kept)
    return {
        "product": product,
        "granularity": g,
        "calibration": {
            "rows": fitted.rows,
            "first": iso(fitted.first).isoformat(),
            "last": iso(fitted.last).isoformat(),
            "quantiles": fitted.quantiles,
        },
        "device": device,
        "pooled": pooled,
    }


def run(served: ProductModels, part: Dataset) -> tuple[Floats, dict[str, Floats]]:
    """sigma and each model's served log return on every row of ``part``, one row at a time, as served."""
    sigma = np.array([served.sigma(x) for x in part.X])
    return sigma, {name: np.array([m.log_return(x) for x in part.X]) for name, m in served.models.items()}


COLUMNS = [
    ("mae", "MAE", "{:,.2f}"),
    ("skill_vs_persistence", "skill vs persistence", "{:+.2%}"),
    ("coverage_80", "80% coverage", "{:.1%}"),
    ("coverage_95", "95% coverage", "{:.1%}"),
    ("interval_skill_80", "80% interval skill", "{:+.1%}"),
    ("interval_skill_95", "95% interval skill", "{:+.1%}"),
]


def report(results: dict[str, Any]) -> str:
    """A readable table per left-out product: device-calibrated, pooled quantiles, its own version."""
    out = []
    for product, r in results.items():
        c = r["calibration"]
        rows = {f"{n}, calibrated on the device": m for n, m in r["device"].items()}
        rows |= {f"{n}, pooled quantiles": m for n, m in r["pooled"].items()}
        if "own" in r:
            rows |= {f"{n}, {product}'s own version": m for n, m in r["own"]["models"].items()}
        out.append(
            f"{product} left out (pooled set trained on {', '.join(r['trained_on'])}; calibrated on "
            f"{c['rows']} candles {c['first'][:16]} .. {c['last'][:16]})\n{table(rows, COLUMNS)}\n"
        )
    return "\n".join(out)
