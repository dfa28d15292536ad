"""``python -m training``: train, evaluate and register the models (runs in CI, not on the Pi)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.candles import PRODUCT_PATTERN
from appliance.helpers.cli import cli_time
from appliance.logs import setup_logging
from appliance.registry import ANY_PRODUCT
from training import EXIT_GATE_REFUSED, GATE_MARGIN, GATE_P

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train, evaluate, export to ONNX and register a new model version"),
        ("evaluate", "hold-out and walk-forward evaluation only; writes nothing"),
        ("leave-one-out", "each product scored by a pooled set trained without it, calibrated as the "
                          "appliance calibrates it (writes nothing to the registry)"),
    ):  # fmt: skip
        p = sub.add_parser(name, help=text)
        if name == "leave-one-out":
            p.add_argument(
                "--data",
                type=product_file,
                action="append",
                required=True,
                metavar="PRODUCT=FILE",
                help="a product and its candles (CSV or cryptopi SQLite file); two or more",
            )
            p.add_argument(
                "--own",
                type=Path,
                default=Path("appliance/models"),
                help="registry whose own versions of each product are shown beside",
            )
        else:
            p.add_argument("--data", type=Path, help="candle CSV or cryptopi SQLite file")
            p.add_argument("--product", help="the product trained on and served")
            p.add_argument(
                "--pooled",
                type=product_file,
                action="append",
                default=[],
                metavar="PRODUCT=FILE",
                help=f"instead of --data and --product: a product of a pooled version ('{ANY_PRODUCT}', "
                "served to any product without its own) and its candles; once per product",
            )
        p.add_argument("--granularity", type=int, default=3600)
        p.add_argument(
            "--holdout-start",
            type=cli_time,
            default="2025-11-01",
            help="first candle of the hold-out (ISO-8601 or epoch); nothing after is used to fit",
        )
        p.add_argument("--epochs", type=int, default=60, help="most CNN epochs (early stopping decides)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--folds", type=int, default=3, help="walk-forward folds")
        p.add_argument("--tiny", action="store_true", help="a small, fast CNN (for tests, not for use)")
        if name == "train":
            p.add_argument("--out", type=Path, default=Path("appliance/models"), help="registry folder")
            p.add_argument(
                "--gate-margin",
                type=float,
                default=GATE_MARGIN,
                help="most a model's hold-out MAE may exceed persistence's (0.002 = 0.2%%)",
            )
            p.add_argument(
                "--gate-p",
                type=float,
                default=GATE_P,
                help="refuse a model significantly worse than persistence (one-sided DM p below this)",
            )
            p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
        else:
            p.add_argument("--json", type=Path, help="also write the scores here (JSON)")
    from training.release import __doc__ as release_doc
    from training.release import add_arguments as release_arguments

    release_arguments(sub.add_parser("release", help="CD's release: back-fill, train, gate, build and push",
                                     description=release_doc))  # fmt: skip
    return parser


def product_file(text: str) -> tuple[str, Path]:
    """``PRODUCT=FILE``, e.g. ``ETH-USD=appliance/datasets/coinbase_ETH-USD_1h.csv``."""
    product, sep, path = text.partition("=")
    if not sep or not re.match(PRODUCT_PATTERN, product) or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not PRODUCT=FILE, like ETH-USD=candles.csv")
    return product, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.command == "release":
        from training.release import run

        return run(args, main)
    from training.card import table
    from training.models import CnnSettings
    from training.pipeline import TrainConfig, fit_and_score, register

    cnn = CnnSettings(epochs=args.epochs, seed=args.seed)
    if args.tiny:
        cnn = CnnSettings(epochs=min(args.epochs, 3), seed=args.seed, conv_filters=8, dense_units=8)
    if args.command == "leave-one-out":
        from training.leave_one_out import leave_one_out, report

        if len(args.data) < 2 or len({p for p, _ in args.data}) != len(args.data):
            parser.error("leave-one-out needs two or more different products (--data PRODUCT=FILE)")
        base = TrainConfig(
            data=None,
            product=ANY_PRODUCT,
            pool=tuple(args.data),
            granularity=args.granularity,
            holdout_start=args.holdout_start,
            cnn=cnn,
            walk_forward_folds=args.folds,
        )
        results = leave_one_out(base, args.own)
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if bool(args.pooled) == bool(args.data or args.product) or (args.data is None) != (args.product is None):
        parser.error("give --data and --product (one product's version), or --pooled PRODUCT=FILE ...")
    cfg = TrainConfig(
        data=args.data,
        product=args.product or ANY_PRODUCT,
        pool=tuple(args.pooled),
        granularity=args.granularity,
        holdout_start=args.holdout_start,
        cnn=cnn,
        walk_forward_folds=args.folds,
        gate_margin=getattr(args, "gate_margin", GATE_MARGIN),
        gate_p=getattr(args, "gate_p", GATE_P),
    )
    try:
        scored = fit_and_score(cfg)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    per_product = "".join(f"\n{p} hold-out\n{table(m)}\n" for p, m in scored.by_product.items())
    print(
        f"\n{cfg.product} hold-out\n{table(scored.holdout)}\n{per_product}\n"
        f"walk-forward\n{table(scored.walk_forward)}\n"
    )
    if args.command == "evaluate":
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"holdout": scored.holdout, "walk_forward": scored.walk_forward}
                    | {f"holdout:{p}": m for p, m in scored.by_product.items()},
                    indent=2,
                )
                + "\n"
            )
        return 0
    result = register(cfg, scored, args.out, force=args.force)
    print(f"wrote {result.folder}")
    if not result.promoted:
        print(f"NOT promoted: {result.reason} (use --force to promote anyway)")
        return EXIT_GATE_REFUSED
    print(
        f"promoted: {cfg.product} {args.granularity}s latest -> {result.manifest.version} ({result.reason})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
