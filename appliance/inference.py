"""ONNX Runtime inference from the model registry, swapped atomically when a new version appears.

Sessions are created once per model version, checked (sha256, feature spec) and warmed up before
they replace the ones serving; a broken or mismatched version is refused and the old one keeps
serving. A prediction is one feature row through each model: raw features in, log return out,
interval from the model's calibration and the row's realized volatility.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.features import CandleSeries, feature_row, realized_volatility
from appliance.health import Conditions
from appliance.metrics import MODEL_INFO, MODEL_REFUSED
from appliance.predictions import PredictionRow
from appliance.registry import Manifest, RegistryError, latest_versions, load_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    session: ort.InferenceSession
    input_name: str
    output_name: str
    quantiles: dict[str, float]

    def log_return(self, row: np.ndarray) -> float:
        out = self.session.run([self.output_name], {self.input_name: row.reshape(1, -1).astype(np.float32)})
        return float(np.asarray(out[0]).ravel()[0])


@dataclass(frozen=True)
class ProductModels:
    manifest: Manifest
    models: dict[str, LoadedModel]


def load_models(folder: Path) -> ProductModels:
    """Check a version and open its sessions; RegistryError (never a half-loaded set) if it is unfit."""
    manifest = load_version(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one row at a time: threads only add latency on a Pi
    options.inter_op_num_threads = 1
    models = {}
    for name, entry in manifest.models.items():
        try:
            session = ort.InferenceSession(
                str(folder / entry.file), options, providers=["CPUExecutionProvider"]
            )
            model = LoadedModel(name, session, entry.input_name, entry.output_name, entry.intervals.quantiles)
            warm = model.log_return(np.zeros(len(manifest.feature_spec.names)))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RegistryError(f"{folder}: {name} does not run: {exc}") from None
        if not math.isfinite(warm) or not {"0.8", "0.95"} <= set(entry.intervals.quantiles):
            raise RegistryError(f"{folder}: {name} answers {warm} or lacks 80/95 % intervals")
        models[name] = model
    return ProductModels(manifest, models)


class Inference:
    def __init__(self, registry: Path, products: tuple[str, ...], health: Conditions | None = None) -> None:
        self.registry = registry
        self.products = products
        self.health = health or Conditions()  # refused versions and an unreadable registry show in /health
        self.serving: dict[str, ProductModels] = {}
        self._seen: dict[str, str] = {}

    def reload(self) -> bool:
        """Pick up new ``latest`` versions; True if anything changed. Never raises for a bad version."""
        try:
            wanted = latest_versions(self.registry)
        except (OSError, RegistryError, ValueError) as exc:
            self.health.problem("models", "model registry unreadable; serving what is loaded",
                                registry=str(self.registry), error=str(exc))  # fmt: skip
            return False
        self.health.ok("models")
        changed = False
        for product in self.products:
            version = wanted.get(product)
            if version is None or self._seen.get(product) == version:
                continue
            self._seen[product] = version  # a refused version is not retried until latest changes
            started = time.monotonic()
            try:
                loaded = load_models(self.registry / version)
                if loaded.manifest.product != product:
                    raise RegistryError(f"{version} is a {loaded.manifest.product} model, not {product}")
            except RegistryError as exc:
                MODEL_REFUSED.labels(product).inc()
                old = self.serving.get(product)
                self.health.problem(
                    "models", "model version refused", subject=product, version=version, error=str(exc),
                    still_serving=old.manifest.version if old else None,
                )  # fmt: skip
                continue
            old = self.serving.get(product)
            self.serving[product] = loaded  # the swap: one assignment
            self.health.ok("models", subject=product)
            for name in loaded.models:
                if old:
                    MODEL_INFO.remove(product, name, old.manifest.version)
                MODEL_INFO.labels(product, name, version).set(1)
            changed = True
            ms = round((time.monotonic() - started) * 1000, 1)
            log.info("models loaded", extra={"product": product, "version": version,
                                             "models": ",".join(loaded.models), "ms": ms})  # fmt: skip
        return changed

    def models_of(self, product: str) -> list[str]:
        loaded = self.serving.get(product)
        return sorted(loaded.models) if loaded else []

    def predict(self, product: str, series: CandleSeries) -> list[PredictionRow]:
        """Each model's prediction of the candle after ``series``' last; MissingHistory if it is short."""
        loaded = self.serving.get(product)
        if loaded is None:
            return []
        g = loaded.manifest.granularity
        if series.granularity != g:
            raise ValueError(f"{product} models want {g}s candles, got {series.granularity}s")
        row = feature_row(series)
        vol = float(realized_volatility(row)[0])
        close = float(series.close[-1])
        as_of = int(series.start[-1]) + g
        now = time.time()
        out = []
        for name, model in loaded.models.items():
            r = model.log_return(row)
            q80, q95 = model.quantiles["0.8"] * vol, model.quantiles["0.95"] * vol
            out.append(PredictionRow(
                product, name, as_of, loaded.manifest.version, g, as_of + g, close, close * math.exp(r),
                close * math.exp(r - q80), close * math.exp(r + q80),
                close * math.exp(r - q95), close * math.exp(r + q95), now,
            ))  # fmt: skip
        return out
