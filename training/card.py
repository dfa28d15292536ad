"""The model card: what was trained on what, how it scored against persistence, and three plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.data import iso
from training.evaluate import LEVELS, bounds

if TYPE_CHECKING:
    from training.pipeline import Scored

PLOT_DAYS = 14
COLUMNS = [
    ("mae", "MAE (USD)", "{:,.2f}"),
    ("rmse", "RMSE", "{:,.2f}"),
    ("mape_pct", "MAPE %", "{:.3f}"),
    ("skill_vs_persistence", "skill vs persistence", "{:+.2%}"),
    ("directional_accuracy", "direction", "{:.1%}"),
    ("coverage_80", "80% coverage", "{:.1%}"),
    ("coverage_95", "95% coverage", "{:.1%}"),
    ("interval_score_80", "80% interval score", "{:,.1f}"),
    ("interval_skill_80", "80% interval skill", "{:+.1%}"),
]


def table(scores: dict[str, dict[str, float | None]]) -> str:
    lines = [
        "| model | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, m in scores.items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "n/a" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_card(folder: Path, product: str, s: Scored) -> None:
    test, g = s.test, s.test.granularity
    predictions = {name: m.predict(test.X) for name, m in s.models.items()}
    times = (test.start + 2 * g).astype("datetime64[s]")  # when each predicted candle closes
    recent = slice(max(0, len(test) - PLOT_DAYS * 86_400 // g), len(test))

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(times[recent], test.target[recent], color="black", lw=1.2, label="actual close")
    for name, colour in (("lasso", "tab:blue"), ("cnn", "tab:orange")):
        ax.plot(
            times[recent], (test.close * np.exp(predictions[name]))[recent], color=colour, lw=0.9, label=name
        )
    lo, hi = bounds(test, predictions["lasso"], s.calibration["lasso"].scaled["0.8"])
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
    ax.set_title(f"{product}: hold-out errors (USD)")
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

    first, last = iso(test.start[0] + g), iso(test.start[-1] + 2 * g)
    multipliers = ", ".join(
        f"{name} {c.scaled['0.8']:.2f} (80 %) / {c.scaled['0.95']:.2f} (95 %)"
        for name, c in s.calibration.items()
    )
    (folder / "MODEL_CARD.md").write_text(f"""# {product} next-candle models

Trained on real Coinbase {product} candles of {g} s. The training period runs from
{iso(s.train.start[0]):%Y-%m-%d} to the hold-out. The hold-out covers {first:%Y-%m-%d %H:%M} →
{last:%Y-%m-%d %H:%M} UTC ({len(test):,} predictions) and was never used for fitting, early stopping,
choosing the regularisation or calibrating the intervals.

All models predict the next candle's close. Persistence predicts "next close = last close", so its
skill is 0 by definition.

## Hold-out

{table(s.holdout)}

## Walk-forward, inside the training period

The second half of the training period is cut into blocks. Each block is predicted by models fitted
only on what came before it. The figures are means over the blocks.

{table(s.walk_forward)}

## Intervals

Each interval is the predicted log return ± q * the realized volatility of the last 24 candles. q is
the empirical quantile of |error| / volatility on the calibration rows: the last 15 % of the training
period, after the rows the models were fitted on. Multipliers:
{multipliers}.
"Interval skill" compares each model's interval score with that of a constant-width interval calibrated
the same way: the share of the score that adapting to volatility saves.

## Plots

![hold-out](holdout.png)
![residuals](residuals.png)
![coverage](coverage.png)
""")
