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

from appliance.features import FEATURE_NAMES, SPEC_HASH, SPEC_NAME
from appliance.registry import (
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
from training.data import Dataset, build_dataset, iso, load_candles
from training.evaluate import Calibration, Metrics, calibrate, choose_shrink, evaluate, walk_forward
from training.export import OnnxPredictor, export, quantize_int8
from training.models import (
    CnnSettings,
    Persistence,
    Predictor,
    Shrunk,
    VolatilityModel,
    fit_cnn,
    fit_lasso,
    fit_volatility,
)

log = logging.getLogger(__name__)
HOLDOUT_START = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class TrainConfig:
    data: Path
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


def fit_and_score(cfg: TrainConfig) -> Scored:
    series = load_candles(cfg.data, cfg.product, cfg.granularity)
    ds = build_dataset(series)
    train, test = ds.split_at(cfg.holdout_start)
    if len(train) < 200 or len(test) < 20:
        raise ValueError(f"too little data: {len(train)} training rows, {len(test)} hold-out rows")
    log.info(
        "dataset",
        extra={
            "product": cfg.product,
            "granularity": cfg.granularity,
            "candles": len(series),
            "rows_train": len(train),
            "rows_holdout": len(test),
            "first": iso(train.start[0]).isoformat(),
            "holdout_from": iso(cfg.holdout_start).isoformat(),
        },
    )

    def lasso(part: Dataset) -> Predictor:
        return fit_lasso(part.X, part.log_return)

    def cnn(part: Dataset) -> Predictor:
        fit, val = part.tail_fraction(cfg.val_fraction)
        return fit_cnn(fit.X, fit.log_return, val.X, val.log_return, cfg.cnn)

    fitters = {"lasso": lasso, "cnn": cnn}
    fit_part, calib_part = train.tail_fraction(cfg.calib_fraction)
    seconds: dict[str, float] = {}
    started = time.monotonic()
    volatility = fit_volatility(fit_part.X, fit_part.next_gk)
    seconds["volatility"] = time.monotonic() - started
    fitted: dict[str, Predictor] = {}
    for name, fit in fitters.items():
        started = time.monotonic()
        log.info("fitting", extra={"model": name, "rows": len(fit_part)})
        fitted[name] = fit(fit_part)
        seconds[name] = time.monotonic() - started
    started = time.monotonic()
    log.info("walk-forward evaluation", extra={"folds": cfg.walk_forward_folds})
    folds = walk_forward(train, fitters, cfg.walk_forward_folds, cfg.calib_fraction)
    seconds["walk_forward"] = time.monotonic() - started
    # Shrinkage from the walk-forward's out-of-sample predictions: the training period only.
    rows = folds.rows
    models: dict[str, Predictor] = {"persistence": Persistence()}
    for name, model in fitted.items():
        factor = choose_shrink(rows.close, rows.target, folds.predicted[name])
        log.info("shrinkage toward persistence", extra={"model": name, "factor": factor})
        models[name] = Shrunk(name, model, factor)
    return rescore(Scored({}, volatility, {}, {}, folds.scores, train, calib_part, test, seconds), models)


def rescore(scored: Scored, models: dict[str, Predictor]) -> Scored:
    """Calibrate ``models`` on the calibration rows and score them on the hold-out (replacing any
    earlier scores of the same names)."""
    calib, test, vol = scored.calib, scored.test, scored.volatility
    calibration = {
        name: calibrate(calib, m.predict(calib.X), vol.sigma(calib.X)) for name, m in models.items()
    }
    holdout = {name: evaluate(test, m.predict(test.X), vol.sigma(test.X), calibration[name])
               for name, m in models.items()}  # fmt: skip
    return replace(scored, models=scored.models | models, calibration=scored.calibration | calibration,
                   holdout=scored.holdout | holdout)  # fmt: skip


def gate(holdout: dict[str, Metrics], margin: float, p: float) -> tuple[bool, str]:
    """Promote only if every served model's hold-out MAE is within ``margin`` of persistence's (or
    better) and no model is significantly worse (one-sided Diebold-Mariano p-value below ``p``)."""
    failures = []
    for name, m in holdout.items():
        skill, dm_p = m["skill_vs_persistence"], m["dm_p"]
        if name == "persistence" or skill is None:
            continue
        if skill < -margin:
            failures.append(f"{name} MAE skill {skill:+.2%} is below -{margin:.1%}")
        if dm_p is not None and dm_p < p:
            failures.append(
                f"{name} is significantly worse than persistence (Diebold-Mariano p = {dm_p:.3g})"
            )
    passed = f"every model's MAE within {margin:.1%} of persistence's, none significantly worse (p >= {p})"
    return not failures, "; ".join(failures) or passed


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
    return candidate, info | {"weights": "int8-dynamic"}


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
        passed, reason = gate(scored.holdout, cfg.gate_margin, cfg.gate_p)  # on what will be served

        def entry(name: str) -> ModelEntry:
            model, exported = scored.models[name], exports.get(name)
            shrink = model.factor if isinstance(model, Shrunk) else 1.0
            return ModelEntry(
                file=exported.path.name if exported else None,
                framework={"lasso": "scikit-learn", "cnn": "keras"}.get(name, "none"),
                input_name=exported.input_name if exported else None,
                output_name=exported.output_name if exported else None,
                shrink=shrink, intervals=IntervalCalibration(quantiles=scored.calibration[name].served),
                metrics={"holdout": scored.holdout[name], "walk_forward": scored.walk_forward[name]},
                params=params.get(name, {}),
            )  # fmt: skip

        entries = {name: entry(name) for name in scored.models}
        volatility = VolatilityEntry(
            file=vol.path.name, input_name=vol.input_name, output_name=vol.output_name,
            metrics={part: {k: v for k, v in m["persistence"].items() if "interval" in k or "coverage" in k}
                     for part, m in (("holdout", scored.holdout), ("walk_forward", scored.walk_forward))},
            params=scored.volatility.params | {"fit_seconds": round(scored.seconds["volatility"], 1)},
        )  # fmt: skip
        write_card(folder, cfg.product, scored)
        files = {p.name: sha256_of(p) for p in sorted(folder.iterdir())}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        version = f"{cfg.product}-{cfg.granularity}s-{created:%Y%m%dT%H%MZ}-{digest}".lower()
        manifest = Manifest(
            version=version, created_at=created, product=cfg.product, granularity=cfg.granularity,
            feature_spec=FeatureSpecRef(name=SPEC_NAME, hash=SPEC_HASH, names=list(FEATURE_NAMES)),
            models=entries, volatility=volatility,
            training_data=TrainingData(
                source=cfg.data.name, first_candle=iso(scored.train.start[0]),
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
