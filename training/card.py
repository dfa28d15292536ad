"""The model card: what was trained on what, how it scored against persistence, and four plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from appliance.calibration import LEVELS
from appliance.candles import quote_currency
from training.data import iso
from training.evaluate import Scored, bounds
from training.models import Shrunk

PLOT_DAYS = 14
COLUMNS = [
    ("mae", "MAE (USD)", "{:,.2f}"),
    ("rmse", "RMSE", "{:,.2f}"),
    ("mape_pct", "MAPE %", "{:.3f}"),
    ("skill_vs_persistence", "skill vs persistence", "{:+.2%}"),
    ("dm_stat", "DM stat", "{:+.2f}"),
    ("dm_p", "DM p (worse)", "{:.3f}"),
    ("directional_accuracy", "direction", "{:.1%}"),
    ("coverage_80", "80% coverage", "{:.1%}"),
    ("coverage_95", "95% coverage", "{:.1%}"),
    ("interval_score_80", "80% interval score", "{:,.1f}"),
    ("interval_skill_80", "80% interval skill", "{:+.1%}"),
    ("interval_skill_95", "95% interval skill", "{:+.1%}"),
]
TERCILES = [(f"coverage_{level}_tercile_{t}", f"{level}% in tercile {t}", "{:.1%}")
            for level in (80, 95) for t in (1, 2, 3)]  # fmt: skip
SCALE_COLUMNS = [
    ("interval_skill_80", "80% volatility model", "{:+.1%}"),
    ("interval_skill_95", "95% volatility model", "{:+.1%}"),
    ("rv24_interval_skill_80", "80% last-24 realized", "{:+.1%}"),
    ("rv24_interval_skill_95", "95% last-24 realized", "{:+.1%}"),
]


def table(scores: dict[str, dict[str, float | None]], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    lines = [
        "| model | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, m in scores.items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "n/a" for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_card(folder: Path, title: str, s: Scored) -> None:
    """``title``: the product, or what a pooled set was trained on. A pooled set's plots show its
    first product, in that product's prices."""
    product, test = next(iter(s.tests.items()), (title, s.test))
    g = test.granularity
    predictions = {name: m.predict(test.X) for name, m in s.models.items()}
    sigma = s.volatility.sigma(test.X)
    times = (test.start + 2 * g).astype("datetime64[s]")  # when each predicted candle closes
    recent = slice(max(0, len(test) - PLOT_DAYS * 86_400 // g), len(test))

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(times[recent], test.target[recent], color="black", lw=1.2, label="actual close")
    for name, colour in (("lasso", "tab:blue"), ("cnn", "tab:orange")):
        ax.plot(
            times[recent], (test.close * np.exp(predictions[name]))[recent], color=colour, lw=0.9, label=name
        )
    lo, hi = bounds(test, predictions["lasso"], s.calibration["lasso"].served["0.8"] * sigma)
    ax.fill_between(
        times[recent], lo[recent], hi[recent], color="tab:blue", alpha=0.15, label="lasso 80% interval"
    )
    ax.set_title(f"{product}: next-candle predictions, last {PLOT_DAYS} days of the hold-out")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(folder / "holdout.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in predictions.items():
        errors = test.close * np.exp(m) - test.target
        ax.hist(errors, bins=80, histtype="step", label=f"{name} (MAE {np.mean(np.abs(errors)):,.0f})")
    ax.set_title(f"{product}: hold-out errors ({quote_currency(product)})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "residuals.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, name in enumerate(predictions):
        cover = [s.holdout[name][f"coverage_{round(level * 100)}"] or 0 for level in LEVELS]
        ax.bar(np.arange(len(LEVELS)) + i * width, cover, width, label=name)
    ax.scatter(
        np.arange(len(LEVELS)) + width, LEVELS, color="black", marker="_", s=900, label="nominal", zorder=3
    )
    ax.set_xticks(np.arange(len(LEVELS)) + width, [f"{level:.0%} interval" for level in LEVELS])
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"{product}: hold-out interval coverage")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "coverage.png", dpi=90)
    plt.close(fig)

    # Interval width against the move that came: the volatility model's sigma is what adapts.
    moved = np.abs(test.log_return) * 100
    half = s.calibration["persistence"].served["0.8"] * sigma * 100
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(half, moved, s=3, alpha=0.25, color="tab:blue", label="a prediction")
    edges = np.quantile(half, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, half, side="right") - 1, 0, 9)
    centre = [np.median(half[bins == b]) for b in range(10)]
    ax.plot(centre, [np.quantile(moved[bins == b], 0.8) for b in range(10)], "o-", color="tab:orange",
            label="80th percentile of |move| per width decile")  # fmt: skip
    top = float(np.quantile(half, 0.995))
    ax.plot([0, top], [0, top], "k--", lw=1, label="|move| = half-width")
    ax.set_xlim(0, top)
    ax.set_ylim(0, float(np.quantile(moved, 0.995)))
    ax.set_xlabel("80% interval half-width (% of price)")
    ax.set_ylabel("realized |move| (%)")
    ax.set_title(f"{product}: interval width against the realized move (hold-out)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / "width.png", dpi=90)
    plt.close(fig)

    first, last = iso(test.start[0] + g), iso(test.start[-1] + 2 * g)
    multipliers = ", ".join(
        f"{name} {c.served['0.8']:.2f} (80 %) / {c.served['0.95']:.2f} (95 %)"
        for name, c in s.calibration.items()
    )
    shrink = ", ".join(f"{name} {m.factor:.2f}" for name, m in s.models.items() if isinstance(m, Shrunk))
    vol = s.volatility.params
    pooled = "".join(f"\n### {p}\n\n{table(m)}\n" for p, m in s.by_product.items())
    if pooled:
        pooled = f"""
A pooled set serves any product without models of its own. It reads only the features that mean
the same for every product (log ratios, returns, RSI, log variances, the calendar; not the log
price or the volumes, which are counted in the base asset). The hold-out above is scored in units
of each candle's last close (an MAE of 0.003 is 0.3 % of the price), so that every product counts
alike; here is each product's own, in its own prices (the plots show {product}). On the appliance,
a product's intervals are calibrated again from its own history (appliance/calibration.py).
{pooled}"""
    (folder / "MODEL_CARD.md").write_text(f"""# {title} next-candle models

Trained on real Coinbase {title} candles of {g} s. The training period runs from
{iso(s.train.start[0]):%Y-%m-%d} to the hold-out. The hold-out covers {first:%Y-%m-%d %H:%M} →
{last:%Y-%m-%d %H:%M} UTC ({len(test):,} predictions) and was never used for fitting, early stopping,
choosing the regularisation or calibrating the intervals.

All models predict the next candle's close. Persistence predicts "next close = last close", so its
skill is 0 by definition; it is served beside the others, with the same kind of interval. Each
learned model's predicted log return is shrunk toward zero (persistence) by a factor chosen on the
walk-forward's out-of-sample predictions, inside the training period: {shrink}.

"DM" is a one-sided Diebold-Mariano test of "this model's absolute error is larger than
persistence's", with a HAC (Newey-West) variance: a p below 0.05 means significantly worse, and the
promotion gate refuses it.

## Hold-out

{table(s.holdout)}
{pooled}
Interval coverage by tercile of the volatility model's sigma (1 = the calmest third of the hold-out):

{table(s.holdout, TERCILES)}

Interval-score skill against a constant width calibrated the same way, for the volatility model's
scale and for the realized volatility of the last 24 candles (spec v1's scale):

{table(s.holdout, SCALE_COLUMNS)}

## Walk-forward, inside the training period

The second half of the training period is cut into blocks. Each block is predicted by models fitted
only on what came before it. The figures are means over the blocks, for the learned models as
fitted (before shrinkage, which these predictions choose).

{table(s.walk_forward)}

{table(s.walk_forward, SCALE_COLUMNS)}

## Intervals

Each interval is the predicted log return ± q * sigma, where sigma comes from the volatility model:
a ridge regression (penalty {vol["alpha"]:g}, by time-series cross-validation) of the next candle's
log Garman-Klass variance on {vol["inputs"]} (the hour of the week one-hot encoded). q is the
empirical quantile of |error| / sigma on the calibration rows: the last 15 % of the training
period, after the rows the models were fitted on. Multipliers:
{multipliers}.
"Interval skill" compares each model's interval score with that of a constant-width interval
calibrated the same way: the share of the score that adapting to volatility saves.

## Plots

![hold-out](holdout.png)
![residuals](residuals.png)
![coverage](coverage.png)
![interval width against the realized move](width.png)
""")
