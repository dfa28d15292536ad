"""The model registry: versioned folders of ONNX files with a manifest, and a ``latest`` per product.

Training writes it (``python -m training train``); the appliance reads it. Reading verifies every
file's sha256 and the feature spec's hash, so a corrupted or stale model is refused, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.features import SPEC_HASH, SPEC_NAME

LATEST = "latest.json"
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
    """Prediction intervals: log-return +- quantile * realized volatility (split-conformal)."""

    scale: str = "realized_volatility_24"
    quantiles: dict[str, float]  # level ("0.8") -> multiplier of the volatility


class ModelEntry(_Frozen):
    file: str
    framework: str
    input_name: str
    output_name: str
    output: str = "log_return"  # next close = last close * exp(output)
    intervals: IntervalCalibration
    metrics: dict[str, dict[str, float | None]]  # "holdout" / "walk_forward" -> metric -> value
    params: dict[str, float | int | str] = Field(default_factory=dict)


class TrainingData(_Frozen):
    source: str
    first_candle: datetime
    last_candle: datetime
    holdout_start: datetime
    rows_train: int
    rows_holdout: int


class Manifest(_Frozen):
    version: str
    created_at: datetime
    product: str
    granularity: int
    horizon: int = 1  # candles ahead
    target: str = "close of the next candle"
    feature_spec: FeatureSpecRef
    models: dict[str, ModelEntry]
    baseline: dict[str, dict[str, float | None]]  # persistence's metrics, for comparison
    training_data: TrainingData
    gate: dict[str, float | bool | str]
    files: dict[str, str]  # file name -> sha256 (every file of the version but the manifest)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_version(folder: Path) -> Manifest:
    """The manifest of a version, after checking its files and feature spec; RegistryError if not."""
    try:
        manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    except (OSError, ValidationError) as exc:
        raise RegistryError(f"{folder}: unreadable manifest: {exc}") from None
    for name, expected in manifest.files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise RegistryError(f"{folder}: file {name!r} is missing")
        if sha256_of(path) != expected:
            raise RegistryError(f"{folder}: {name} does not match its sha256 in the manifest")
    for model, entry in manifest.models.items():
        if entry.file not in manifest.files:
            raise RegistryError(f"{folder}: model {model} names {entry.file}, which has no checksum")
    spec = manifest.feature_spec
    if (spec.name, spec.hash) != (SPEC_NAME, SPEC_HASH):
        raise RegistryError(
            f"{folder}: trained on feature spec {spec.name} {spec.hash[:12]}, this build computes "
            f"{SPEC_NAME} {SPEC_HASH[:12]}"
        )
    return manifest


def latest_versions(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / LATEST).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RegistryError(f"{root / LATEST} is not a product -> version map")
    return data


def latest(root: Path, product: str) -> Manifest | None:
    version = latest_versions(root).get(product)
    return load_version(root / version) if version else None


def set_latest(root: Path, product: str, version: str) -> None:
    """Point ``product`` at ``version``, atomically (a reader sees the old or the new map, whole)."""
    if not _VERSION.match(version) or not (root / version / "manifest.json").is_file():
        raise RegistryError(f"no version {version!r} in {root}")
    versions = latest_versions(root) | {product: version}
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(sorted(versions.items())), fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / LATEST)
