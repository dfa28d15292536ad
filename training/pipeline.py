"""Train, evaluate, export and register: what ``python -m training train`` does, step by step."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from appliance.features import FEATURE_NAMES, SPEC_HASH, SPEC_NAME
from appliance.registry import (
    ANY_PRODUCT,
    INT8_WEIGHTS,
    FeatureSpecRef,
    IntervalCalibration,
    Manifest,
    ModelEntry,
    TrainingData,
    VolatilityEntry,
    set_latest,
    sha256_of,
)
from training import GATE_MARGIN, GATE_P
from training.card import write_card
from training.data import Dataset, build_dataset, iso, load_candles, pool
from training.evaluate import Metrics, Scored, calibrate, choose_shrink, evaluate, walk_forward
from training.export import OnnxPredictor, export, quantize_int8
from training.models import (
    SCALE_FREE,
    CnnSettings,
    Persistence,
    Predictor,
    Shrunk,
    fit_cnn,
    fit_lasso,
    fit_volatility,
)

log = logging.getLogger(__name__)
HOLDOUT_START = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class TrainConfig:
    """What to train. One product's version: ``data`` (a candle CSV or a cryptopi store) and its
    ``product``. A pooled version, which serves any product without a version of its own:
    ``product=ANY_PRODUCT`` and ``pool``, the products it learns from, each with its candles."""

    data: Path | None
    product: str
    granularity: int = 3600
    holdout_start: int = HOLDOUT_START
    cnn: CnnSettings = field(default_factory=CnnSettings)
    calib_fraction: float = 0.15  # tail of the training period: interval calibration
    val_fraction: float = 0.15  # tail of the rest: the CNN's early stopping
    walk_forward_folds: int = 3
    gate_margin: float = GATE_MARGIN  # a model's MAE may be at most this much worse than persistence's ...
    gate_p: float = GATE_P  # ... and not significantly worse (one-sided Diebold-Mariano p below this)
    quantize: bool = True  # serve the CNN as int8 weights ...
    quant_tolerance: float = 0.001  # ... if its hold-out MAE is at most this much (relative) worse
    pool: tuple[tuple[str, Path], ...] = ()  # a pooled version's (product, candles) pairs

    def __post_init__(self) -> None:
        if self.pooled != bool(self.pool) or (self.data is None) != self.pooled:
            raise ValueError(
                f"a pooled version ({ANY_PRODUCT}) has a pool and no data; a product's, data only"
            )

    @property
    def pooled(self) -> bool:
        return self.product == ANY_PRODUCT

    @property
    def sources(self) -> tuple[tuple[str, Path], ...]:
        """The (product, candles) pairs trained on."""
        return ((self.product, self.data),) if self.data is not None else self.pool

    @property
    def columns(self) -> tuple[str, ...]:
        """The features the models read: a pooled set only those that mean the same for any product."""
        return SCALE_FREE if self.pooled else FEATURE_NAMES


def load_dataset(cfg: TrainConfig) -> tuple[Dataset, dict[str, Dataset]]:
    """The rows trained and scored on (a pooled set's in relative units: see ``Dataset.relative``),
    and for a pooled set each product's own rows, in its own prices."""
    parts = {}
    for product, path in cfg.sources:
        series = load_candles(path, product, cfg.granularity)
        parts[product] = build_dataset(series, product)
        log.info("candles", extra={"product": product, "granularity": cfg.granularity,
                                   "candles": len(series), "rows": len(parts[product])})  # fmt: skip
    ds = pool(list(parts.values()))
    return (ds.relative(), parts) if cfg.pooled else (ds, {})


def fit_and_score(cfg: TrainConfig) -> Scored:
    ds, parts = load_dataset(cfg)
    train, test = ds.split_at(cfg.holdout_start)
    if len(train) < 200 or len(test) < 20:
        raise ValueError(f"too little data: {len(train)} training rows, {len(test)} hold-out rows")
    log.info(
        "dataset",
        extra={
            "product": cfg.product,
            "products": ",".join(p for p, _ in cfg.sources),
            "granularity": cfg.granularity,
            "rows_train": len(train),
            "rows_holdout": len(test),
            "first": iso(train.start[0]).isoformat(),
            "holdout_from": iso(cfg.holdout_start).isoformat(),
        },
    )
    columns = cfg.columns

    def lasso(part: Dataset) -> Predictor:
        return fit_lasso(part.X, part.log_return, columns=columns)

    def cnn(part: Dataset) -> Predictor:
        fit, val = part.tail_fraction(cfg.val_fraction)
        return fit_cnn(fit.X, fit.log_return, val.X, val.log_return, replace(cfg.cnn, columns=columns))

    fitters = {"lasso": lasso, "cnn": cnn}
    fit_part, calib_part = train.tail_fraction(cfg.calib_fraction)
    seconds: dict[str, float] = {}
    started = time.monotonic()
    volatility = fit_volatility(fit_part.X, fit_part.next_gk, columns=columns)
    seconds["volatility"] = time.monotonic() - started
    fitted: dict[str, Predictor] = {}
    for name, fit in fitters.items():
        started = time.monotonic()
        log.info("fitting", extra={"model": name, "rows": len(fit_part)})
        fitted[name] = fit(fit_part)
        seconds[name] = time.monotonic() - started
    started = time.monotonic()
    log.info("walk-forward evaluation", extra={"folds": cfg.walk_forward_folds})
    folds = walk_forward(train, fitters, cfg.walk_forward_folds, cfg.calib_fraction, columns)
    seconds["walk_forward"] = time.monotonic() - started
    # Shrinkage from the walk-forward's out-of-sample predictions: the training period only. A pooled
    # set keeps a signal only as far as it holds on every product it learns from and in every block
    # of the walk-forward (the smallest factor): serving products it never saw, into a future that
    # may not look like one stretch of the past, it has no business betting on an edge that one
    # product or one stretch of time shows and the others do not.
    rows = folds.rows
    subsets = {"all": np.ones(len(rows), dtype=bool)}
    if cfg.pool:
        blocks = np.zeros(len(rows), dtype=int)
        for i, block in enumerate(np.array_split(np.arange(len(rows)), cfg.walk_forward_folds)):
            blocks[block] = i
        products = dict.fromkeys(rows.product.tolist())
        subsets = {
            f"{p}.{b}": (rows.product == p) & (blocks == b)
            for p in products
            for b in range(cfg.walk_forward_folds)
        }
    models: dict[str, Predictor] = {"persistence": Persistence()}
    for name, model in fitted.items():
        factors = {
            key: choose_shrink(rows.close[mine], rows.target[mine], folds.predicted[name][mine])
            for key, mine in subsets.items()
        }
        factor = min(factors.values())
        log.info("shrinkage toward persistence", extra={"model": name, "factor": factor} | factors)
        models[name] = Shrunk(name, model, factor)
    tests = {p: d.split_at(cfg.holdout_start)[1] for p, d in parts.items()}
    scored = Scored({}, volatility, {}, {}, folds.scores, train, calib_part, test, seconds, tests)
    return rescore(scored, models)


def rescore(scored: Scored, models: dict[str, Predictor]) -> Scored:
    """Calibrate ``models`` on the calibration rows and score them on the hold-out (replacing any
    earlier scores of the same names), and on each pooled product's hold-out."""
    calib, test, vol = scored.calib, scored.test, scored.volatility
    calibration = {
        name: calibrate(calib, m.predict(calib.X), vol.sigma(calib.X)) for name, m in models.items()
    }

    def scores(part: Dataset) -> dict[str, Metrics]:
        sigma = vol.sigma(part.X)
        return {
            name: evaluate(part, m.predict(part.X), sigma, calibration[name]) for name, m in models.items()
        }

    by_product = {p: scored.by_product.get(p, {}) | scores(part) for p, part in scored.tests.items()}
    return replace(scored, models=scored.models | models, calibration=scored.calibration | calibration,
                   holdout=scored.holdout | scores(test), by_product=by_product)  # fmt: skip


def gate(holdout: dict[str, Metrics], margin: float, p: float, of: str = "") -> tuple[bool, str]:
    """Promote only if every served model's hold-out MAE is within ``margin`` of persistence's (or
    better) and no model is significantly worse (one-sided Diebold-Mariano p-value below ``p``).
    ``of``: whose hold-out it is, to name in the reasons (a pooled set is gated on each product's)."""
    failures = []
    for name, m in holdout.items():
        skill, dm_p = m["skill_vs_persistence"], m["dm_p"]
        if name == "persistence" or skill is None:
            continue
        if skill < -margin:
            failures.append(f"{of}{name} MAE skill {skill:+.2%} is below -{margin:.1%}")
        if dm_p is not None and dm_p < p:
            failures.append(
                f"{of}{name} is significantly worse than persistence (Diebold-Mariano p = {dm_p:.3g})"
            )
    passed = f"every model's MAE within {margin:.1%} of persistence's, none significantly worse (p >= {p})"
    return not failures, "; ".join(failures) or passed


def gate_all(scored: Scored, cfg: TrainConfig) -> tuple[bool, str]:
    """The gate on the hold-out; a pooled set's also on each product's own, so that pooling never
    hides a product it serves worse than persistence."""
    verdicts = [gate(scored.holdout, cfg.gate_margin, cfg.gate_p)]
    verdicts += [gate(m, cfg.gate_margin, cfg.gate_p, f"{p}: ") for p, m in scored.by_product.items()]
    failed = [reason for passed, reason in verdicts if not passed]
    return not failed, "; ".join(failed) or verdicts[0][1] + (
        " (pooled and per product)" if cfg.pooled else ""
    )


@dataclass(frozen=True)
class Registered:
    folder: Path
    manifest: Manifest
    promoted: bool
    reason: str


def serve_quantized(cfg: TrainConfig, scored: Scored, fp32: Path) -> tuple[Scored, dict[str, float | str]]:
    """Replace the CNN's file with its int8 version if that costs at most ``quant_tolerance`` of MAE.

    The decision, and then the served model's intervals and metrics, come from the int8 graph itself
    (with the same shrinkage).
    """
    cnn = scored.models["cnn"]
    assert isinstance(cnn, Shrunk)
    int8 = OnnxPredictor(quantize_int8(fp32, fp32.with_name("cnn.int8.onnx")), "cnn")
    candidate = rescore(scored, {"cnn": Shrunk("cnn", int8, cnn.factor)})
    fp32_mae, int8_mae = scored.holdout["cnn"]["mae"], candidate.holdout["cnn"]["mae"]
    assert fp32_mae is not None
    assert int8_mae is not None
    change = int8_mae / fp32_mae - 1
    info: dict[str, float | str] = {"fp32_holdout_mae": fp32_mae, "int8_holdout_mae_change": change}
    log.info(
        "int8 quantization", extra={"mae_change": f"{change:+.4%}", "kept": change <= cfg.quant_tolerance}
    )
    if change > cfg.quant_tolerance:
        int8.path.unlink()
        return scored, info | {"weights": "fp32"}
    int8.path.replace(fp32)  # served under the usual name; the session already holds the graph
    int8.path = fp32
    return candidate, info | {"weights": INT8_WEIGHTS}


def register(cfg: TrainConfig, scored: Scored, out: Path, *, force: bool = False) -> Registered:
    """Export, document and write a new version under ``out``; point ``latest`` at it if the gate passes."""
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).replace(microsecond=0)
    # Built in a hidden folder and renamed into place: a version is complete or absent.
    folder = Path(tempfile.mkdtemp(dir=out, prefix=".new-"))
    try:
        trained = {name: m for name, m in scored.models.items() if isinstance(m, Shrunk)}
        params = {name: dict(getattr(m.model, "params", {})) | {"fit_seconds": round(scored.seconds[name], 1)}
                  for name, m in trained.items()}  # fmt: skip
        exports = {
            name: export(m.model, folder / f"{name}.onnx", scored.test.X) for name, m in trained.items()
        }
        vol = export(scored.volatility, folder / "volatility.onnx", scored.test.X)
        for name, exported in (exports | {"volatility": vol}).items():
            log.info("exported", extra={"model": name, "parity": f"{exported.max_rel_error:.1e}"})
        if cfg.quantize:
            scored, info = serve_quantized(cfg, scored, exports["cnn"].path)
            params["cnn"] |= info
        passed, reason = gate_all(scored, cfg)  # on what will be served

        def entry(name: str) -> ModelEntry:
            model, exported = scored.models[name], exports.get(name)
            shrink = model.factor if isinstance(model, Shrunk) else 1.0
            return ModelEntry(
                file=exported.path.name if exported else None,
                framework={"lasso": "scikit-learn", "cnn": "keras"}.get(name, "none"),
                input_name=exported.input_name if exported else None,
                output_name=exported.output_name if exported else None,
                shrink=shrink, intervals=IntervalCalibration(quantiles=scored.calibration[name].served),
                metrics={"holdout": scored.holdout[name], "walk_forward": scored.walk_forward[name]}
                        | {f"holdout:{p}": m[name] for p, m in scored.by_product.items()},
                params=params.get(name, {}),
            )  # fmt: skip

        entries = {name: entry(name) for name in scored.models}
        volatility = VolatilityEntry(
            file=vol.path.name, input_name=vol.input_name, output_name=vol.output_name,
            metrics={part: {k: v for k, v in m["persistence"].items() if "interval" in k or "coverage" in k}
                     for part, m in (("holdout", scored.holdout), ("walk_forward", scored.walk_forward))},
            params=scored.volatility.params | {"fit_seconds": round(scored.seconds["volatility"], 1)},
        )  # fmt: skip
        products = [p for p, _ in cfg.sources]
        write_card(folder, f"pooled ({', '.join(products)})" if cfg.pooled else cfg.product, scored)
        files = {p.name: sha256_of(p) for p in sorted(folder.iterdir())}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        name = "pooled" if cfg.pooled else cfg.product
        version = f"{name}-{cfg.granularity}s-{created:%Y%m%dT%H%MZ}-{digest}".lower()
        manifest = Manifest(
            version=version, created_at=created, product=cfg.product, granularity=cfg.granularity,
            feature_spec=FeatureSpecRef(name=SPEC_NAME, hash=SPEC_HASH, names=list(FEATURE_NAMES)),
            models=entries, volatility=volatility,
            training_data=TrainingData(
                source=",".join(dict.fromkeys(path.name for _, path in cfg.sources)), products=products,
                first_candle=iso(scored.train.start[0]),
                last_candle=iso(scored.test.start[-1] + cfg.granularity),
                holdout_start=iso(cfg.holdout_start),
                rows_train=len(scored.train), rows_holdout=len(scored.test),
            ),
            gate={"margin": cfg.gate_margin, "p": cfg.gate_p, "passed": passed, "reason": reason,
                  "forced": force and not passed},
            files=files,
        )  # fmt: skip
        (folder / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        final = out / version
        folder.chmod(0o755)  # mkdtemp's 0700 would hide the models from a non-root appliance
        folder.rename(final)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if passed or force:
        set_latest(out, cfg.product, cfg.granularity, version)
    return Registered(final, manifest, passed or force, reason)
