"""ONNX Runtime inference from the model registry, swapped atomically when a new version appears.

Sessions are created once per model version, checked (sha256, feature spec) and warmed up before
they replace the ones serving; a broken or mismatched version is refused and the old one keeps
serving. A prediction is one feature row through the volatility model (sigma) and each point model
(raw features in, log return out, times its shrink factor; persistence, and a model shrunk all the
way to it, run nothing), with the interval from the model's calibration times sigma. Versions are
per product and granularity; one version serving many products (a pooled one) is loaded once, and
its intervals are calibrated per product on the device (:mod:`appliance.calibration`) once the
calibrator has done so.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.features import CandleSeries, feature_row
from appliance.health import Conditions
from appliance.metrics import MODEL_INFO, MODEL_REFUSED
from appliance.predictions import Calibration, PredictionRow
from appliance.registry import (
    ANY_PRODUCT,
    Manifest,
    RegistryError,
    latest_versions,
    load_version,
    resolve,
    version_folder,
)

log = logging.getLogger(__name__)
NOT_YET = "not calibrated on this device yet: the pooled set's intervals meanwhile"


@dataclass(frozen=True)
class Graph:
    """One ONNX graph: a feature row in, one number out."""

    session: ort.InferenceSession
    input_name: str
    output_name: str

    def run(self, row: np.ndarray) -> float:
        out = self.session.run([self.output_name], {self.input_name: row.reshape(1, -1).astype(np.float32)})
        return float(np.asarray(out[0]).ravel()[0])


@dataclass(frozen=True)
class LoadedModel:
    name: str
    #: None: nothing to run, the point is persistence's (persistence itself, or a model whose shrink
    #: factor is 0: its graph is still checked when loaded, but times 0 it adds nothing but CPU).
    graph: Graph | None
    shrink: float
    quantiles: dict[str, float]

    def log_return(self, row: np.ndarray) -> float:
        return self.shrink * self.graph.run(row) if self.graph else 0.0


@dataclass(frozen=True)
class ProductModels:
    manifest: Manifest
    models: dict[str, LoadedModel]
    volatility: Graph

    def sigma(self, row: np.ndarray) -> float:
        """The next candle's volatility (std of its log return, up to the models' multipliers)."""
        return math.exp(0.5 * self.volatility.run(row))

    @property
    def pooled(self) -> bool:
        """A pooled version: it serves products it was not trained on."""
        return self.manifest.product == ANY_PRODUCT


def load_models(folder: Path) -> ProductModels:
    """Check a version and open its sessions; RegistryError (never a half-loaded set) if it is unfit."""
    manifest = load_version(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one row at a time: threads only add latency on a Pi
    options.inter_op_num_threads = 1
    zeros = np.zeros(len(manifest.feature_spec.names))

    def graph(what: str, file: str, input_name: str, output_name: str) -> Graph:
        try:
            g = Graph(ort.InferenceSession(str(folder / file), options, providers=["CPUExecutionProvider"]),
                      input_name, output_name)  # fmt: skip
            warm = g.run(zeros)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RegistryError(f"{folder}: {what} does not run: {exc}") from None
        if not math.isfinite(warm):
            raise RegistryError(f"{folder}: {what} answers {warm}")
        return g

    vol = manifest.volatility
    volatility = graph("the volatility model", vol.file, vol.input_name, vol.output_name)
    models = {}
    for name, entry in manifest.models.items():
        if not {"0.8", "0.95"} <= set(entry.intervals.quantiles):
            raise RegistryError(f"{folder}: {name} lacks 80/95 % intervals")
        g = None
        if entry.file and entry.input_name and entry.output_name:  # the registry checks they go together
            g = graph(name, entry.file, entry.input_name, entry.output_name)
        models[name] = LoadedModel(name, g if entry.shrink else None, entry.shrink, entry.intervals.quantiles)
    return ProductModels(manifest, models, volatility)


class Inference:
    def __init__(
        self,
        registry: Path,
        products: tuple[str, ...],
        granularities: tuple[int, ...] = (3600,),
        health: Conditions | None = None,
    ) -> None:
        self.registry = registry
        self.products = products
        self.granularities = granularities
        self.health = health or Conditions()  # refused versions and an unreadable registry show in /health
        self.serving: dict[tuple[str, int], ProductModels] = {}
        #: The device's calibrations of products served by a pooled version (set by the calibrator).
        self.calibrations: dict[tuple[str, int], Calibration] = {}
        self._seen: dict[tuple[str, int], str] = {}

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
        opened: dict[str, ProductModels | RegistryError] = {}

        def open_once(version: str) -> ProductModels:
            """Each version is checked and loaded once a reload, however many products it serves."""
            if version not in opened:
                try:
                    opened[version] = load_models(version_folder(self.registry, version))
                except RegistryError as exc:
                    opened[version] = exc
            found = opened[version]
            if isinstance(found, RegistryError):
                raise found
            return found

        for key in ((p, g) for p in self.products for g in self.granularities):
            product, g = key
            version = resolve(wanted, product, g)
            if version is None or self._seen.get(key) == version:
                continue
            self._seen[key] = version  # a refused version is not retried until latest changes
            started = time.monotonic()
            try:
                loaded = open_once(version)
                m = loaded.manifest
                if m.product not in (product, ANY_PRODUCT) or m.granularity != g:
                    raise RegistryError(
                        f"{version} is a {m.product} {m.granularity}s model, not {product} {g}s"
                    )
            except RegistryError as exc:
                MODEL_REFUSED.labels(product).inc()
                old = self.serving.get(key)
                self.health.problem(
                    "models", "model version refused", subject=f"{product} {g}s", version=version,
                    error=str(exc), still_serving=old.manifest.version if old else None,
                )  # fmt: skip
                continue
            old = self.serving.get(key)
            self.serving[key] = loaded  # the swap: one assignment
            self.health.ok("models", subject=f"{product} {g}s")
            for name in loaded.models:
                if old:
                    MODEL_INFO.remove(product, name, old.manifest.version)
                MODEL_INFO.labels(product, name, version).set(1)
            changed = True
            ms = round((time.monotonic() - started) * 1000, 1)
            log.info("models loaded", extra={"product": product, "granularity": g, "version": version,
                                             "models": ",".join(loaded.models), "ms": ms})  # fmt: skip
        return changed

    def serving_of(self, product: str, granularity: int = 3600) -> ProductModels | None:
        return self.serving.get((product, granularity))

    def models_of(self, product: str, granularity: int = 3600) -> list[str]:
        loaded = self.serving_of(product, granularity)
        return sorted(loaded.models) if loaded else []

    def calibration_of(self, product: str, granularity: int = 3600) -> Calibration | None:
        """How ``product``'s intervals at ``granularity`` are calibrated now (None: no models)."""
        loaded = self.serving_of(product, granularity)
        if loaded is None:
            return None
        version = loaded.manifest.version
        if not loaded.pooled:
            return Calibration(product, granularity, version, "training")
        device = self.calibrations.get((product, granularity))
        if device is not None and device.version == version:
            return device
        return Calibration(product, granularity, version, "pooled", reason=NOT_YET)

    def predict(self, product: str, series: CandleSeries) -> list[PredictionRow]:
        """Each model's prediction of the candle after ``series``' last, by the models of the series'
        granularity; MissingHistory if it is short."""
        g = series.granularity
        loaded = self.serving_of(product, g)
        calibration = self.calibration_of(product, g)
        if loaded is None or calibration is None:
            return []
        row = feature_row(series)
        sigma = loaded.sigma(row)
        close = float(series.close[-1])
        as_of = int(series.start[-1]) + g
        now = time.time()
        device = calibration.quantiles if calibration.method == "device" else None
        out = []
        for name, model in loaded.models.items():
            r = model.log_return(row)
            q = device[name] if device is not None else model.quantiles
            q80, q95 = q["0.8"] * sigma, q["0.95"] * sigma
            out.append(PredictionRow(
                product, name, as_of, loaded.manifest.version, g, as_of + g, close, close * math.exp(r),
                close * math.exp(r - q80), close * math.exp(r + q80),
                close * math.exp(r - q95), close * math.exp(r + q95), now, None,
                calibration.method, calibration.calibrated_at if device is not None else None,
                calibration.reason,
            ))  # fmt: skip
        return out
