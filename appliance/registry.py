"""The model registry: versioned folders of ONNX files with a manifest, and a ``latest`` per product
and granularity.

Training writes it (``python -m training train``); the appliance reads it. Reading verifies every
file's sha256 and the feature spec's hash, so a corrupted or stale model is refused, never served.

``latest.json`` (format 2) maps product, then granularity (seconds, as a string), to a version::

    {"format": 2, "versions": {"BTC-USD": {"900": "btc-usd-900s-...", "3600": "btc-usd-3600s-..."}}}

A product key ``*`` stands for any product: a pooled version trained on several products serves
every product that has no version of its own at that granularity. A format-1 file (a flat
product -> version map, all hourly) is still read, as granularity 3600.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.features import SPEC_HASH, SPEC_NAME

LATEST = "latest.json"
#: The largest file a version may hold: the int8 CNN is 2 MB, fp32 8.6 MB. Anything far bigger is a
#: mistake or an attack, and is refused from its size alone, before hashing or loading it.
MAX_FILE_BYTES = 64 << 20
ANY_PRODUCT = "*"
_VERSION = re.compile(r"^[a-z0-9][a-z0-9._-]{2,100}$")


class RegistryError(RuntimeError):
    """A model version that must not be served, with the reason."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureSpecRef(_Frozen):
    name: str
    hash: str
    names: list[str]


class IntervalCalibration(_Frozen):
    """Prediction intervals: log-return +- quantile * the volatility model's sigma (split-conformal)."""

    scale: str = "volatility_model"
    quantiles: dict[str, float]  # level ("0.8") -> multiplier of sigma


#: ``params["weights"]`` of a model served from a dynamically quantized graph, whose integer kernels
#: are the CPU's own (its figures hold to the last digit only on a CPU like the one that trained it).
INT8_WEIGHTS = "int8-dynamic"


class ModelEntry(_Frozen):
    """A point model. Without a file it is persistence: a log return of zero, no graph to run."""

    file: str | None
    framework: str
    input_name: str | None = None
    output_name: str | None = None
    output: str = "log_return"  # next close = last close * exp(shrink * output)
    shrink: float = Field(1.0, ge=0.0, le=1.0)  # toward zero return, chosen on the training period
    intervals: IntervalCalibration
    metrics: dict[str, dict[str, float | None]]  # "holdout" / "walk_forward" -> metric -> value
    params: dict[str, float | int | str] = Field(default_factory=dict)

    @property
    def int8(self) -> bool:
        return self.params.get("weights") == INT8_WEIGHTS

    @model_validator(mode="after")
    def _graph_is_named(self) -> ModelEntry:
        if self.file is not None and not (self.input_name and self.output_name):
            raise ValueError(f"{self.file} needs its input_name and output_name")
        return self


class VolatilityEntry(_Frozen):
    """The model of the next candle's volatility that every interval is scaled by."""

    file: str
    framework: str = "scikit-learn"
    input_name: str
    output_name: str
    output: str = "log_variance"  # sigma = exp(output / 2)
    metrics: dict[str, dict[str, float | None]]
    params: dict[str, float | int | str] = Field(default_factory=dict)


class TrainingData(_Frozen):
    source: str
    products: list[str] = Field(default_factory=list)  # those trained on (a pooled version's several)
    first_candle: datetime
    last_candle: datetime
    holdout_start: datetime
    rows_train: int
    rows_holdout: int


class Manifest(_Frozen):
    version: str
    created_at: datetime
    product: str  # or ANY_PRODUCT for a pooled version
    granularity: int
    horizon: int = 1  # candles ahead
    target: str = "close of the next candle"
    feature_spec: FeatureSpecRef
    models: dict[str, ModelEntry]  # persistence among them, served like any other
    volatility: VolatilityEntry
    training_data: TrainingData
    gate: dict[str, float | bool | str]
    files: dict[str, str]  # file name -> sha256 (every file of the version but the manifest)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_folder(root: Path, version: str) -> Path:
    """The folder of ``version`` in the registry at ``root``; RegistryError for a name that is not a
    version's, or that resolves outside the registry (``..``, an absolute path, a symlink out)."""
    folder = root / version
    if not _VERSION.match(version) or not folder.resolve().is_relative_to(root.resolve()):
        raise RegistryError(f"{root}: {version!r} is not a version of this registry")
    return folder


def load_version(folder: Path) -> Manifest:
    """The manifest of a version, after checking its files and feature spec; RegistryError if not."""
    try:
        raw = json.loads((folder / "manifest.json").read_text())
        spec = raw["feature_spec"]
        name, digest = str(spec["name"]), str(spec["hash"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{folder}: unreadable manifest: {exc!r}") from None
    # First, so that a version of another spec (whose manifest may differ too) gets the real reason.
    if (name, digest) != (SPEC_NAME, SPEC_HASH):
        raise RegistryError(
            f"{folder}: trained on feature spec {name} {digest[:12]}, this build computes "
            f"{SPEC_NAME} {SPEC_HASH[:12]}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(f"{folder}: unreadable manifest: {exc}") from None
    inside = folder.resolve()
    for name, expected in manifest.files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or path.resolve().parent != inside:
            raise RegistryError(f"{folder}: file {name!r} is missing")
        if (size := path.stat().st_size) > MAX_FILE_BYTES:
            raise RegistryError(f"{folder}: {name} is {size:,} bytes, more than {MAX_FILE_BYTES:,}")
        if sha256_of(path) != expected:
            raise RegistryError(f"{folder}: {name} does not match its sha256 in the manifest")
    graphs = {f"model {m}": e.file for m, e in manifest.models.items() if e.file is not None}
    for what, file in (graphs | {"the volatility model": manifest.volatility.file}).items():
        if file not in manifest.files:
            raise RegistryError(f"{folder}: {what} names {file}, which has no checksum")
    return manifest


Versions = dict[str, dict[int, str]]  # product (or ANY_PRODUCT) -> granularity -> version


def latest_versions(root: Path) -> Versions:
    """What ``latest.json`` points at; {} if there is none."""
    try:
        data = json.loads((root / LATEST).read_text())
    except FileNotFoundError:
        return {}
    if isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
        return {product: {3600: version} for product, version in data.items()}  # format 1
    versions = data.get("versions") if isinstance(data, dict) and data.get("format") == 2 else None
    if not isinstance(versions, dict) or not all(
        isinstance(by_g, dict) and all(g.isdigit() and isinstance(v, str) for g, v in by_g.items())
        for by_g in versions.values()
    ):
        raise RegistryError(f"{root / LATEST} is not a product -> granularity -> version map")
    return {product: {int(g): v for g, v in by_g.items()} for product, by_g in versions.items()}


def resolve(versions: Versions, product: str, granularity: int) -> str | None:
    """The version serving ``product`` at ``granularity``: its own, else a pooled one."""
    for key in (product, ANY_PRODUCT):
        if (version := versions.get(key, {}).get(granularity)) is not None:
            return version
    return None


def latest(root: Path, product: str, granularity: int = 3600) -> Manifest | None:
    version = resolve(latest_versions(root), product, granularity)
    return load_version(version_folder(root, version)) if version else None


def set_latest(root: Path, product: str, granularity: int, version: str) -> None:
    """Point ``product`` at ``granularity`` to ``version``, atomically (a reader sees the old or the
    new map, whole)."""
    if not _VERSION.match(version) or not (version_folder(root, version) / "manifest.json").is_file():
        raise RegistryError(f"no version {version!r} in {root}")
    versions = latest_versions(root)
    versions.setdefault(product, {})[granularity] = version
    doc = {"format": 2, "versions": {p: {str(g): v for g, v in sorted(by_g.items())}
                                     for p, by_g in sorted(versions.items())}}  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / LATEST)
