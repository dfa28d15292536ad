"""The training pipeline on real candles, with a tiny CNN so it stays quick.

Real data, real TensorFlow and scikit-learn, real ONNX export checked with onnxruntime, a real
registry on disk; only the network's size and epochs are cut down.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.history import import_csv
from appliance.registry import RegistryError, latest, latest_versions, load_version
from appliance.store import Store
from tests.conftest import BTC_1H, REPO
from training.data import load_candles
from training.evaluate import calibrate, evaluate
from training.export import export
from training.models import CnnSettings, fit_lasso
from training.pipeline import Registered, Scored, TrainConfig, fit_and_score, register

SHIPPED = REPO / "appliance" / "models"
TINY = TrainConfig(data=BTC_1H, product="BTC-USD", walk_forward_folds=2,
                   cnn=CnnSettings(epochs=3, conv_filters=8, dense_units=8))  # fmt: skip


@pytest.fixture(scope="module")
def scored() -> Scored:
    return fit_and_score(TINY)


@pytest.fixture(scope="module")
def registry(scored: Scored, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Registered]:
    root = tmp_path_factory.mktemp("registry")
    return root, register(TINY, scored, root)


def test_nothing_at_or_after_the_holdout_is_used_to_fit(scored: Scored) -> None:
    holdout = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp())
    assert scored.train.start.max() + 2 * 3600 <= holdout + 3600  # its target candle opens before it
    assert scored.test.start.min() + 3600 >= holdout
    assert set(scored.holdout) == set(scored.walk_forward) == {"persistence", "lasso", "cnn"}
    assert scored.holdout["persistence"]["skill_vs_persistence"] == 0
    # Scaling intervals by recent volatility beats a constant width on unseen data (the real skill).
    assert scored.holdout["persistence"]["interval_skill_80"] > 0.03  # type: ignore[operator]
    # Calibrated on the training period, the intervals hold roughly on the unseen hold-out.
    for name in scored.holdout:
        assert 0.7 < scored.holdout[name]["coverage_80"] < 0.9  # type: ignore[operator]
        assert 0.9 < scored.holdout[name]["coverage_95"] < 0.99  # type: ignore[operator]


def test_registered_version_is_complete_and_verified(registry: tuple[Path, Registered]) -> None:
    root, result = registry
    assert result.promoted
    manifest = latest(root, "BTC-USD")
    assert manifest is not None
    assert manifest.version == result.manifest.version
    assert set(manifest.models) == {"lasso", "cnn"}
    assert {"manifest.json", "MODEL_CARD.md", "holdout.png", "residuals.png", "coverage.png",
            "lasso.onnx", "cnn.onnx"} <= {p.name for p in result.folder.iterdir()}  # fmt: skip
    assert manifest.training_data.holdout_start == datetime(2025, 11, 1, tzinfo=UTC)
    assert (
        manifest.models["cnn"].intervals.quantiles["0.95"] > manifest.models["cnn"].intervals.quantiles["0.8"]
    )
    assert "| persistence |" in (result.folder / "MODEL_CARD.md").read_text()


def onnx_prices(path: Path, scored: Scored) -> np.ndarray:
    """One row per call, as served (a dynamically quantized graph scales activations per call)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, rows = session.get_inputs()[0].name, scored.test.X.astype(np.float32)
    r = np.array([session.run(None, {name: rows[i : i + 1]})[0].ravel()[0] for i in range(len(rows))])
    return np.asarray(scored.test.close * np.exp(r.astype(np.float64)))


def test_onnx_export_matches_the_frameworks_on_the_holdout(scored: Scored, tmp_path: Path) -> None:
    for name in ("lasso", "cnn"):
        export(scored.models[name], tmp_path / f"{name}.onnx", scored.test.X)
        framework = scored.test.close * np.exp(scored.models[name].predict(scored.test.X))
        assert np.max(np.abs(onnx_prices(tmp_path / f"{name}.onnx", scored) / framework - 1)) <= 1e-4, name


@pytest.mark.parametrize(("tolerance", "weights"), [(1.0, "int8-dynamic"), (-1.0, "fp32")])
def test_int8_cnn_is_served_only_within_tolerance(
    scored: Scored, tmp_path: Path, tolerance: float, weights: str
) -> None:
    result = register(replace(TINY, quant_tolerance=tolerance), scored, tmp_path)
    entry = result.manifest.models["cnn"]
    assert entry.params["weights"] == weights
    # The manifest's hold-out MAE is that of the file actually served.
    prices = onnx_prices(result.folder / entry.file, scored)
    assert entry.metrics["holdout"]["mae"] == pytest.approx(
        np.mean(np.abs(prices - scored.test.target)), rel=1e-9
    )
    ops = {node.op_type for node in onnx.load(result.folder / entry.file).graph.node}
    assert ("DynamicQuantizeLinear" in ops) == (weights == "int8-dynamic")


def test_registry_refuses_a_file_whose_sha256_does_not_match(registry, tmp_path: Path) -> None:
    _, result = registry
    copy = tmp_path / result.folder.name
    shutil.copytree(result.folder, copy)
    model = copy / "lasso.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"lasso.onnx does not match its sha256"):
        load_version(copy)


def test_registry_refuses_another_feature_spec(registry, tmp_path: Path) -> None:
    _, result = registry
    copy = tmp_path / result.folder.name
    shutil.copytree(result.folder, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["feature_spec"]["hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="feature spec"):
        load_version(copy)


def test_gate_refuses_a_deliberately_bad_model(scored: Scored, tmp_path: Path) -> None:
    fit, calib = scored.train.tail_fraction(0.15)
    # A real fitted pipeline whose every standardized feature then pushes the same way: confidently wrong.
    bad = fit_lasso(fit.X, fit.log_return)
    bad.pipeline[-1].coef_ = np.full_like(bad.pipeline[-1].coef_, 1e-3)
    cal = calibrate(calib, bad.predict(calib.X))
    sabotaged = replace(
        scored, models=scored.models | {"lasso": bad}, calibration=scored.calibration | {"lasso": cal},
        holdout=scored.holdout | {"lasso": evaluate(scored.test, bad.predict(scored.test.X), cal)},
    )  # fmt: skip
    result = register(TINY, sabotaged, tmp_path)
    assert not result.promoted
    assert "lasso MAE" in result.reason
    assert latest_versions(tmp_path) == {}  # nothing promoted
    assert result.manifest.gate["passed"] is False
    forced = register(TINY, sabotaged, tmp_path, force=True)
    assert forced.promoted
    assert latest_versions(tmp_path) == {"BTC-USD": forced.manifest.version}


def test_cli_exits_non_zero_with_the_reason_when_the_gate_refuses(tmp_path: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--data",
        str(BTC_1H),
        "--product",
        "BTC-USD",
        "--out",
        str(tmp_path),
        "--tiny",
        "--folds",
        "2",
        "--gate-margin",
        "-0.5",
    ]  # must beat persistence by 50%
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "NOT promoted" in out.stdout
    assert "MAE" in out.stdout
    assert latest_versions(tmp_path) == {}


def test_sqlite_store_is_a_data_source_equal_to_the_csv(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        import_csv(store, BTC_1H, "BTC-USD", 3600, progress=False)
    from_db = load_candles(tmp_path / "db.sqlite3", "BTC-USD", 3600)
    from_csv = load_candles(BTC_1H, "BTC-USD", 3600)
    np.testing.assert_array_equal(from_db.start, from_csv.start)
    np.testing.assert_allclose(from_db.close, from_csv.close, rtol=0, atol=0)


def test_shipped_models_load_and_match_this_build() -> None:
    """The models a fresh clone's appliance serves verify against their checksums and this feature code."""
    for product in ("BTC-USD", "ETH-USD"):
        manifest = latest(SHIPPED, product)
        assert manifest is not None, f"no shipped model for {product}"
        assert manifest.training_data.holdout_start == datetime(2025, 11, 1, tzinfo=UTC)
        assert manifest.gate["passed"] is True


def test_evaluate_cli_reports_without_writing_models(tmp_path: Path) -> None:
    report = tmp_path / "scores.json"
    args = [sys.executable, "-m", "training", "evaluate", "--data", str(BTC_1H), "--product", "BTC-USD",
            "--tiny", "--folds", "2", "--json", str(report)]  # fmt: skip
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| persistence |" in out.stdout
    scores = json.loads(report.read_text())
    assert set(scores) == {"holdout", "walk_forward"}
    assert scores["walk_forward"]["lasso"]["folds"] == 2
    assert list(tmp_path.iterdir()) == [report]
