"""``python -m training release``: everything CD does between the checkout and the image registry.

``models``: back-fill every configured product and horizon from a Coinbase-protocol URL into a fresh
store, train and register each into the checkout's registry, and collect the new versions' model cards.
A refusal of the promotion gate ends the release (exit 3: nothing is built or pushed); the other
products still train, so that every card can be read. ``image``: check the registry, build the image
with it baked in and push it with all its tags (``--builder buildx`` on GitHub, ``classic`` where there
is no buildx). ``all``: both, what ``make release-local`` runs. Each stage prints a summary (versions,
hold-out metrics, tags and digest) and writes it to ``WORK/release.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime
from datetime import time as clock
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.candles import COINBASE_GRANULARITIES, PRODUCT_PATTERN, parse_time
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.helpers.cli import cli_time
from appliance.helpers.config import check_url
from appliance.history import backfill as load
from appliance.registry import ANY_PRODUCT, Manifest, latest_versions, load_version
from appliance.settings import Settings
from appliance.store import Store
from training import EXIT_GATE_REFUSED, GATE_MARGIN, GATE_P
from training.image import (
    BUILDERS,
    PLATFORMS,
    REPOSITORY,
    Build,
    Identity,
    ImageError,
    build_and_push,
    check_registry,
)
from training.image import labels as image_labels

log = logging.getLogger(__name__)
DAY = 86_400
CONFIG = Path("config/release.toml")
COINBASE_REST_URL = str(Settings.model_fields["coinbase_rest_url"].default)
#: Where the image is built from and trained into: the checkout's registry is what gets baked in.
MODELS = Path("appliance/models")
CARD_FILES = ("MODEL_CARD.md", "manifest.json", "*.png")
#: The metrics the summary shows per model, from each manifest's hold-out scores.
SHOWN = ("skill_vs_persistence", "dm_p", "coverage_80", "coverage_95")
TrainMain = Callable[[Sequence[str]], int]


class TrainingRun(NamedTuple):
    """One version a release registers, under ``product`` at ``granularity``: ``python -m training ARGV``."""

    product: str
    granularity: int
    argv: list[str]


def _epoch(value: object) -> object:
    """TOML dates and datetimes, ISO-8601 text or epoch digits -> epoch seconds (UTC)."""
    if isinstance(value, datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
    if isinstance(value, date):
        return int(datetime.combine(value, clock(), UTC).timestamp())
    return parse_time(value) if isinstance(value, str) else value


class ReleaseConfig(BaseModel):
    """What a release trains (``config/release.toml``): every product at every granularity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    products: tuple[str, ...] = Field(min_length=1, description="each gets a version of its own")
    pooled: tuple[str, ...] = Field(
        (), description="the pooled set's products (one version under '*', serving any other); empty: none"
    )
    granularities: tuple[int, ...] = Field(min_length=1, description="candle lengths (s): the horizons")
    history_start: int = Field(description="first candle back-filled and trained on")
    history_end: int | None = Field(None, description="back-fill up to here (exclusive); unset: now")
    holdout_days: int = Field(gt=0, description="the newest days, held out for evaluation and the gate")
    cnn: Literal["reference", "tiny"] = Field("reference", description="tiny: quick, for tests only")
    folds: int = Field(3, ge=1, le=10, description="walk-forward folds")
    # A release may make the gate stricter than training's default, never looser.
    gate_margin: float = Field(GATE_MARGIN, le=GATE_MARGIN)
    gate_p: float = Field(GATE_P, ge=GATE_P, lt=1)

    _times = field_validator("history_start", "history_end", mode="before")(_epoch)

    @field_validator("products", "pooled")
    @classmethod
    def _check_products(cls, products: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in products if not re.fullmatch(PRODUCT_PATTERN, p)]
        if bad or len(set(products)) != len(products):
            raise ValueError(
                f"products must be distinct Coinbase product ids such as BTC-USD, got {bad or products}"
            )
        return products

    @field_validator("pooled")
    @classmethod
    def _check_pool(cls, pooled: tuple[str, ...]) -> tuple[str, ...]:
        if len(pooled) == 1:
            raise ValueError("a pooled set learns from two or more products (or none: leave it empty)")
        return pooled

    @field_validator("granularities")
    @classmethod
    def _check_granularities(cls, granularities: tuple[int, ...]) -> tuple[int, ...]:
        distinct = set(granularities)
        if len(distinct) != len(granularities) or not distinct <= set(COINBASE_GRANULARITIES):
            raise ValueError(f"granularities must be distinct, among Coinbase's {COINBASE_GRANULARITIES}")
        return granularities

    @model_validator(mode="after")
    def _check_range(self) -> ReleaseConfig:
        if self.history_end is not None and self.holdout_start(self.history_end) <= self.history_start:
            raise ValueError("the hold-out would begin before history_start: nothing left to train on")
        return self

    @property
    def backfilled(self) -> tuple[str, ...]:
        """Every product a release back-fills: its own versions' and the pooled set's, each once."""
        return tuple(dict.fromkeys((*self.products, *self.pooled)))

    def holdout_start(self, end: int) -> int:
        """Midnight UTC ``holdout_days`` before ``end``: the hold-out's first candle."""
        start = end - self.holdout_days * DAY
        return start - start % DAY

    def training_runs(self, store: Path, registry: Path, end: int) -> list[TrainingRun]:
        """The release's training runs, all from ``store``: every product at every granularity, then
        at each granularity the pooled set (product ``*``) over ``pooled``, if any."""
        common = [
            "--out", str(registry), "--holdout-start", str(self.holdout_start(end)),
            "--folds", str(self.folds), "--gate-margin", repr(self.gate_margin),
            "--gate-p", repr(self.gate_p), *(["--tiny"] if self.cnn == "tiny" else []),
        ]  # fmt: skip
        runs = []
        for g in self.granularities:
            runs += [
                TrainingRun(
                    product,
                    g,
                    ["train", "--data", str(store), "--product", product, "--granularity", str(g), *common],
                )
                for product in self.products
            ]
            if self.pooled:
                pool = [a for p in self.pooled for a in ("--pooled", f"{p}={store}")]
                runs.append(TrainingRun(ANY_PRODUCT, g, ["train", *pool, "--granularity", str(g), *common]))
        return runs


class ConfigRejected(ValueError):
    """A release configuration that cannot run: the message names the file and each bad field."""


def load_config(path: Path, **overrides: object) -> ReleaseConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigRejected(f"{path}: {exc}") from None
    try:
        return ReleaseConfig.model_validate(raw | {k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']} (got {e.get('input')!r:.60})"
                 for e in exc.errors(include_url=False)]  # fmt: skip
        raise ConfigRejected(f"{path}:\n" + "\n".join(lines)) from None


# -- models ---------------------------------------------------------------------------------------------


def backfill(cfg: ReleaseConfig, url: str, store_path: Path, end: int) -> None:
    """Every configured product and granularity from ``url`` into a fresh store at ``store_path``."""
    for stale in store_path.parent.glob(f"{store_path.name}*"):  # the store, its WAL and shared memory
        stale.unlink()

    async def main(store: Store) -> None:
        async with CoinbaseRest(url) as rest:
            for granularity in cfg.granularities:
                for product in cfg.backfilled:
                    result = await load(store, rest, product, granularity, cfg.history_start, end,
                                        progress=sys.stderr.isatty())  # fmt: skip
                    if result.rows == 0:
                        raise ValueError(f"{url} has no {product} candles at {granularity}s in the range")

    store_path.parent.mkdir(parents=True, exist_ok=True)
    with Store(store_path) as store:
        asyncio.run(main(store))


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _versions(registry: Path) -> set[str]:
    return (
        {p.name for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if registry.is_dir()
        else set()
    )


def train(
    cfg: ReleaseConfig, train_main: TrainMain, store: Path, registry: Path, end: int
) -> tuple[int, list[str]]:
    """Every training run; returns the exit status (0, 1 if one failed, else 3 if the gate refused one) and
    the new versions (promoted or not), oldest first."""
    before = _versions(registry)
    statuses = []
    for run in cfg.training_runs(store, registry, end):
        what = {"product": run.product, "granularity": run.granularity}
        log.info("training", extra=what)
        started = time.monotonic()
        try:
            status = train_main(run.argv)
        except Exception:  # one product's crash must not hide the others' cards
            log.exception("training crashed", extra=what)
            status = 1
        statuses.append(status)
        outcome = {0: "promoted", EXIT_GATE_REFUSED: "refused by the gate"}.get(status, f"failed ({status})")
        seconds = round(time.monotonic() - started, 1)
        log.info("trained", extra=what | {"outcome": outcome, "seconds": seconds})
    new = sorted(_versions(registry) - before, key=lambda v: (registry / v).stat().st_mtime)
    failed = any(s not in (0, EXIT_GATE_REFUSED) for s in statuses)
    return (1 if failed else EXIT_GATE_REFUSED if EXIT_GATE_REFUSED in statuses else 0), new


def collect_cards(registry: Path, versions: Sequence[str], out: Path) -> None:
    """Each new version's model card, manifest and plots under ``out/<version>/`` (CD uploads them)."""
    for version in versions:
        dest = out / version
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in CARD_FILES:
            for file in (registry / version).glob(pattern):
                shutil.copy2(file, dest / file.name)


def version_row(manifest: Manifest, promoted: bool) -> dict[str, Any]:
    """One new version for the summary: what it is, the gate's word, and its hold-out metrics."""
    return {
        "version": manifest.version, "product": manifest.product, "granularity": manifest.granularity,
        "promoted": promoted, "gate": manifest.gate["reason"],
        "holdout": {name: {k: entry.metrics["holdout"].get(k) for k in SHOWN}
                    for name, entry in manifest.models.items()},
    }  # fmt: skip


# -- summary --------------------------------------------------------------------------------------------


def _pct(value: object, sign: str = "+") -> str:
    return f"{value:{sign}.2%}" if isinstance(value, float) else "n/a"


def markdown(report: dict[str, Any]) -> str:
    """The release's summary as Markdown (stdout, and GitHub's step summary)."""
    lines = [f"## Release {report['image']['build']}" if "image" in report else "## Release: models"]
    if models := report.get("models"):
        head = (
            "| product | horizon | version | promoted | model | MAE skill | DM p (worse) | 80/95 % coverage |"
        )
        lines += [
            "",
            f"### New versions (hold-out from {models['holdout_start']})",
            "",
            head,
            "|---" * 8 + "|",
        ]
        for v in models["versions"]:
            promoted = "yes" if v["promoted"] else "**no**"
            for name, m in v["holdout"].items():
                dm_p = f"{m['dm_p']:.3f}" if isinstance(m["dm_p"], float) else "n/a"
                lines.append(
                    f"| {v['product']} | {v['granularity']}s | `{v['version']}` | {promoted} | {name}"
                    f" | {_pct(m['skill_vs_persistence'])} | {dm_p}"
                    f" | {_pct(m['coverage_80'], '')} / {_pct(m['coverage_95'], '')} |"
                )
        lines += ["", *(f"- `{v['version']}`: {v['gate']}" for v in models["versions"])]
    if image := report.get("image"):
        serves = [f"{p} {g}s: `{v}`" for p, by_g in image["serves"].items() for g, v in by_g.items()]
        lines += ["", f"### Pushed `{image['repository']}@{image['digest']}`", "",
                  f"Platforms {', '.join(image['platforms'])}; serves {', '.join(serves)}. Tags:", "",
                  *(f"- `{tag}`" for tag in image["tags"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], work: Path, summary: Path | None, cards: Sequence[Path]) -> None:
    """``release.json`` in ``work``, the Markdown on stdout and, with the cards, appended to ``summary``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "release.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    print(text, flush=True)
    if summary is not None:
        with summary.open("a") as fh:
            fh.write(text)
            for card in cards:
                fh.write("\n" + card.read_text())


# -- the command ----------------------------------------------------------------------------------------


def _unless_empty(convert: Callable[[str], int]) -> Callable[[str], int | None]:
    """An argparse type for an override that CI passes empty when nobody set it."""

    def parse(text: str) -> int | None:
        return convert(text) if text.strip() else None

    parse.__name__ = convert.__name__  # what argparse names in its error message
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=("all", "models", "image"), help="what to run: models, image, or both")
    p.add_argument("--config", type=Path, default=CONFIG, help="what to train (TOML)")
    p.add_argument("--context", type=Path, default=Path(), help="the checkout: trained into, then built")
    p.add_argument("--work", type=Path, default=Path("data/release"),
                   help="the release's own files: the candle store, model cards, release.json")  # fmt: skip
    p.add_argument("--summary", type=Path, help="also append the summary (Markdown) to this file")
    models = p.add_argument_group("models")
    models.add_argument(
        "--coinbase-url", default=COINBASE_REST_URL, help="Coinbase Exchange REST (or a replay)"
    )
    models.add_argument("--history-start", type=_unless_empty(cli_time),
                        help="overrides the config's (ISO-8601 or epoch); empty: the config's")  # fmt: skip
    models.add_argument(
        "--holdout-days", type=_unless_empty(int), help="overrides the config's; empty: the config's"
    )
    image = p.add_argument_group("image")
    image.add_argument("--image", help="repository to push to, e.g. cryptopi/appliance or 127.0.0.1:5000/x/y")
    image.add_argument("--builder", choices=BUILDERS, help="buildx (multi-platform) or classic (no BuildKit)")
    image.add_argument("--platform", help=f"buildx only (default: {','.join(PLATFORMS)})")
    image.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                       help="a Dockerfile argument, repeatable (BUILD is the release's own)")  # fmt: skip
    image.add_argument("--cache-from", help="buildx only, e.g. type=gha")
    image.add_argument("--cache-to", help="buildx only, e.g. type=gha,mode=max")
    image.add_argument("--run-number", type=int, default=0, help="the version is <project version>-<this>")
    image.add_argument("--commit", help="the checkout's commit (default: git rev-parse HEAD)")
    image.add_argument("--latest", choices=("true", "false"), default="false", help="also tag latest")
    image.add_argument("--source-url", help="the repository's URL, for the image's source label")


def _check_image_args(args: argparse.Namespace) -> None:
    if not args.image or not args.builder:
        raise ConfigRejected("the image stage needs --image and --builder")
    if not REPOSITORY.fullmatch(args.image):
        raise ConfigRejected(f"--image {args.image!r} is not a repository (lowercase, no tag)")
    if args.builder == "classic" and (args.platform or args.cache_from or args.cache_to):
        raise ConfigRejected("--platform, --cache-from and --cache-to need --builder buildx")
    for arg in args.build_arg:
        name, sep, _ = arg.partition("=")
        if not sep or not name or name == "BUILD":
            raise ConfigRejected(f"--build-arg {arg!r}: expected NAME=VALUE, and BUILD is the release's own")


def _commit(args: argparse.Namespace) -> str:
    if args.commit:
        return str(args.commit)
    git = ["git", "-C", str(args.context), "rev-parse", "HEAD"]
    proc = subprocess.run(git, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ConfigRejected("--commit is needed: the context is not a git checkout")
    return proc.stdout.strip()


def run_models(
    cfg: ReleaseConfig, args: argparse.Namespace, train_main: TrainMain
) -> tuple[int, dict[str, Any]]:
    """Back-fill, train behind the gate, collect the cards; the exit status and the report's part."""
    end = cfg.history_end if cfg.history_end is not None else int(time.time())
    registry, store, cards = args.context / MODELS, args.work / "candles.sqlite3", args.work / "model-cards"
    log.info("back-fill", extra={"url": args.coinbase_url, "products": ",".join(cfg.backfilled),
                                 "granularities": ",".join(map(str, cfg.granularities))})  # fmt: skip
    backfill(cfg, args.coinbase_url, store, end)
    status, new = train(cfg, train_main, store, registry, end)
    shutil.rmtree(cards, ignore_errors=True)
    collect_cards(registry, new, cards)
    served = latest_versions(registry)
    rows = []
    for version in new:
        manifest = load_version(registry / version)
        promoted = served.get(manifest.product, {}).get(manifest.granularity) == version
        rows.append(version_row(manifest, promoted))
    return status, {"config": cfg.model_dump(), "history_end": _iso(end),
                    "holdout_start": _iso(cfg.holdout_start(end)), "versions": rows}  # fmt: skip


def run_image(args: argparse.Namespace, identity: Identity) -> dict[str, Any]:
    """Check the registry, build with it baked in, push every tag; the report's part."""
    serves = check_registry(args.context / MODELS)
    build = Build(
        context=args.context,
        tags=identity.tags(args.image, args.latest == "true"),
        build_args=dict(a.split("=", 1) for a in args.build_arg) | {"BUILD": identity.build},
        labels=image_labels(identity, args.source_url),
        platforms=tuple(args.platform.split(",")) if args.platform else PLATFORMS,
        cache_from=args.cache_from,
        cache_to=args.cache_to,
    )
    pushed = build_and_push(args.builder, build, args.work)
    return asdict(pushed) | {"build": identity.build, "version": identity.version, "serves": serves}


def run(args: argparse.Namespace, train_main: TrainMain) -> int:
    """``python -m training release``; ``train_main`` is ``python -m training``'s own entry point.

    Everything is checked before anything starts (exit 2); then 0, 1 (a failure), or 3 (the gate refused).
    """
    started = time.monotonic()
    models, image = args.stage in ("all", "models"), args.stage in ("all", "image")
    try:
        cfg = identity = None
        if models:
            check_url(args.coinbase_url, ("http", "https"))
            cfg = load_config(args.config, history_start=args.history_start, holdout_days=args.holdout_days)
        if image:
            _check_image_args(args)
            identity = Identity.of(args.context, args.run_number, _commit(args))
    except (ValueError, OSError, KeyError) as exc:  # ConfigRejected among them
        print(f"invalid release configuration: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    cards: list[Path] = []
    try:
        if cfg is not None:
            status, report["models"] = run_models(cfg, args, train_main)
            cards = sorted((args.work / "model-cards").glob("*/MODEL_CARD.md"))
            if status != 0:
                write_report(report, args.work, args.summary, cards)
                refused = status == EXIT_GATE_REFUSED
                why = "the promotion gate refused a version" if refused else "training failed"
                print(f"release stopped: {why}; nothing is built or pushed", file=sys.stderr)
                return status
        if identity is not None:
            report["image"] = run_image(args, identity)
    except (CoinbaseRestError, ImageError, OSError, ValueError) as exc:
        print(f"release failed: {exc}", file=sys.stderr)
        return 1
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(report, args.work, args.summary, cards)
    return 0
