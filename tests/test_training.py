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
from tests.conftest import BTC_1H, BTC_15M, REPO
from training.data import load_candles
from training.evaluate import Scored, choose_shrink, diebold_mariano
from training.export import export
from training.models import CnnSettings, Shrunk, fit_lasso
from training.pipeline import Registered, TrainConfig, fit_and_score, register, rescore

SHIPPED = REPO / "appliance" / "models"
V1_MANIFEST = REPO / "tests" / "data" / "manifest_features_v1.json"
TINY = TrainConfig(data=BTC_1H, product="BTC-USD", walk_forward_folds=2,
                   cnn=CnnSettings(epochs=3, conv_filters=8, dense_units=8))  # fmt: skip
TINY_15M = replace(TINY, data=BTC_15M, granularity=900)


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
    assert scored.calib.start.min() > scored.train.start.min()  # the training period's tail
    assert set(scored.holdout) == set(scored.walk_forward) == {"persistence", "lasso", "cnn"}
    assert scored.holdout["persistence"]["skill_vs_persistence"] == 0
    assert scored.holdout["persistence"]["dm_p"] is None  # the baseline is not tested against itself
    # The volatility model's scale beats a constant width on unseen data, and the last day's
    # realized volatility (spec v1's scale) too.
    for level in (80, 95):
        m = scored.holdout["persistence"]
        assert m[f"interval_skill_{level}"] > m[f"rv24_interval_skill_{level}"] > 0  # type: ignore[operator]
    # Calibrated on the training period, the intervals hold on the unseen hold-out, calm or wild.
    for name, m in scored.holdout.items():
        for level in (80, 95):
            assert abs(m[f"coverage_{level}"] - level / 100) < 0.03, name  # type: ignore[operator]
            for t in (1, 2, 3):
                assert abs(m[f"coverage_{level}_tercile_{t}"] - level / 100) < 0.05, name  # type: ignore[operator]


def test_learned_models_are_served_shrunk_toward_persistence(scored: Scored) -> None:
    for name in ("lasso", "cnn"):
        model = scored.models[name]
        assert isinstance(model, Shrunk)
        assert 0 <= model.factor <= 1
        np.testing.assert_allclose(
            model.predict(scored.test.X), model.factor * model.model.predict(scored.test.X)
        )
    # The choice itself: an oracle keeps its whole signal, a contrarian oracle is cut to persistence,
    # and so is a model whose skill is not significant, even where a factor would fit a little.
    test = scored.test
    assert choose_shrink(test.close, test.target, test.log_return) == 1.0
    assert choose_shrink(test.close, test.target, -test.log_return) == 0.0
    noise = np.random.default_rng(0).normal(0, test.log_return.std(), len(test))
    faint, weak = noise + 0.1 * test.log_return, noise + 0.3 * test.log_return
    assert choose_shrink(test.close, test.target, faint, p=1.0) > 0  # the best factor, untested
    assert choose_shrink(test.close, test.target, faint) == 0.0  # not significant: persistence
    assert choose_shrink(test.close, test.target, weak) > 0  # significant: kept, shrunk


def test_diebold_mariano_is_one_sided_with_hac_variance(scored: Scored) -> None:
    persistence = np.abs(scored.test.close - scored.test.target)
    worse = diebold_mariano(persistence * 1.01, persistence)
    better = diebold_mariano(persistence * 0.99, persistence)
    assert worse is not None
    assert better is not None
    assert worse[0] > 3
    assert worse[1] < 0.01
    assert better[0] < -3
    assert better[1] > 0.99
    assert diebold_mariano(persistence, persistence) is None  # identical forecasts: nothing to test


def test_registered_version_is_complete_and_verified(registry: tuple[Path, Registered]) -> None:
    root, result = registry
    assert result.promoted
    manifest = latest(root, "BTC-USD", 3600)
    assert manifest is not None
    assert manifest.version == result.manifest.version
    assert set(manifest.models) == {"persistence", "lasso", "cnn"}
    assert manifest.models["persistence"].file is None  # served, with intervals, but nothing to run
    files = {"manifest.json", "MODEL_CARD.md", "holdout.png", "residuals.png", "coverage.png", "width.png",
             "lasso.onnx", "cnn.onnx", "volatility.onnx"}  # fmt: skip
    assert files <= {p.name for p in result.folder.iterdir()}
    assert manifest.volatility.output == "log_variance"
    assert manifest.training_data.holdout_start == datetime(2025, 11, 1, tzinfo=UTC)
    for entry in manifest.models.values():
        assert entry.intervals.quantiles["0.95"] > entry.intervals.quantiles["0.8"] > 0
    card = (result.folder / "MODEL_CARD.md").read_text()
    assert "| persistence |" in card
    assert "DM p (worse)" in card
    assert "tercile" in card
    assert latest_versions(root) == {"BTC-USD": {3600: result.manifest.version}}


def onnx_outputs(path: Path, X: np.ndarray) -> np.ndarray:
    """One row per call, as served (a dynamically quantized graph scales activations per call)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, rows = session.get_inputs()[0].name, X.astype(np.float32)
    return np.array([session.run(None, {name: rows[i : i + 1]})[0].ravel()[0] for i in range(len(rows))])


def test_onnx_export_matches_the_frameworks_on_the_holdout(scored: Scored, tmp_path: Path) -> None:
    X = scored.test.X
    for name in ("lasso", "cnn"):
        model = scored.models[name]
        assert isinstance(model, Shrunk)
        export(model.model, tmp_path / f"{name}.onnx", X)
        r = onnx_outputs(tmp_path / f"{name}.onnx", X).astype(np.float64)
        assert np.max(np.abs(np.exp(r - model.model.predict(X)) - 1)) <= 1e-4, name  # on the price
    export(scored.volatility, tmp_path / "volatility.onnx", X)
    log_variance = onnx_outputs(tmp_path / "volatility.onnx", X).astype(np.float64)
    sigma = np.exp(0.5 * log_variance)
    assert np.max(np.abs(sigma / scored.volatility.sigma(X) - 1)) <= 1e-4


@pytest.mark.parametrize(("tolerance", "weights"), [(1.0, "int8-dynamic"), (-1.0, "fp32")])
def test_int8_cnn_is_served_only_within_tolerance(
    scored: Scored, tmp_path: Path, tolerance: float, weights: str
) -> None:
    result = register(replace(TINY, quant_tolerance=tolerance), scored, tmp_path)
    entry = result.manifest.models["cnn"]
    assert entry.params["weights"] == weights
    assert entry.file is not None
    # The manifest's hold-out MAE is that of the file actually served, with its shrinkage.
    r = entry.shrink * onnx_outputs(result.folder / entry.file, scored.test.X).astype(np.float64)
    prices = scored.test.close * np.exp(r)
    assert entry.metrics["holdout"]["mae"] == pytest.approx(
        np.mean(np.abs(prices - scored.test.target)), rel=1e-9
    )
    ops = {node.op_type for node in onnx.load(result.folder / entry.file).graph.node}
    assert ("DynamicQuantizeLinear" in ops) == (weights == "int8-dynamic")


def test_registry_refuses_a_file_whose_sha256_does_not_match(registry, tmp_path: Path) -> None:
    _, result = registry
    copy = tmp_path / result.folder.name
    shutil.copytree(result.folder, copy)
    model = copy / "volatility.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"volatility.onnx does not match its sha256"):
        load_version(copy)


def test_registry_refuses_another_feature_spec(registry, tmp_path: Path) -> None:
    _, result = registry
    copy = tmp_path / result.folder.name
    shutil.copytree(result.folder, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["feature_spec"]["hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="feature spec cryptopi-features-v2 000000000000"):
        load_version(copy)


def test_registry_refuses_a_version_trained_on_spec_v1_naming_both_specs(tmp_path: Path) -> None:
    """A real v1 manifest (its models differ in schema too): the reason given is the spec."""
    v1 = tmp_path / "btc-usd-3600s-20261121t1607z-37f1e62e"
    v1.mkdir()
    shutil.copy(V1_MANIFEST, v1 / "manifest.json")
    with pytest.raises(RegistryError) as refused:
        load_version(v1)
    assert "trained on feature spec cryptopi-features-v1" in str(refused.value)
    assert "this build computes cryptopi-features-v2" in str(refused.value)


def test_gate_refuses_a_deliberately_bad_model(scored: Scored, tmp_path: Path) -> None:
    fit = scored.train.take(scored.train.start < scored.calib.start[0])
    # A real fitted pipeline whose every standardized feature then pushes the same way: confidently
    # wrong, and served unshrunk.
    bad = fit_lasso(fit.X, fit.log_return)
    bad.pipeline[-1].coef_ = np.full_like(bad.pipeline[-1].coef_, 1e-3)
    sabotaged = rescore(scored, {"lasso": Shrunk("lasso", bad, 1.0)})
    assert sabotaged.holdout["lasso"]["dm_p"] < 0.05  # type: ignore[operator]
    result = register(TINY, sabotaged, tmp_path)
    assert not result.promoted
    assert "lasso MAE skill" in result.reason
    assert "lasso is significantly worse than persistence (Diebold-Mariano p = " in result.reason
    assert "cnn" not in result.reason
    assert latest_versions(tmp_path) == {}  # nothing promoted
    assert result.manifest.gate["passed"] is False
    forced = register(TINY, sabotaged, tmp_path, force=True)
    assert forced.promoted
    assert latest_versions(tmp_path) == {"BTC-USD": {3600: forced.manifest.version}}


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
    assert "MAE skill" in out.stdout
    assert latest_versions(tmp_path) == {}


def test_fifteen_minute_models_register_beside_the_hourly_ones(registry: tuple[Path, Registered]) -> None:
    """The 15-minute horizon trains from the 15-minute candles; latest.json maps product and granularity."""
    root, hourly = registry
    cfg = replace(TINY_15M, walk_forward_folds=1)  # quick: the hourly run covers the folds
    scored = fit_and_score(cfg)
    assert scored.test.granularity == 900
    assert len(scored.test) > 3 * 4000  # four predictions an hour over the same hold-out
    for level in (80, 95):
        m = scored.holdout["persistence"]
        assert m[f"interval_skill_{level}"] > m[f"rv24_interval_skill_{level}"] > 0  # type: ignore[operator]
    result = register(cfg, scored, root)
    assert result.promoted, result.reason
    assert result.manifest.granularity == 900
    assert result.manifest.version.startswith("btc-usd-900s-")
    assert latest_versions(root) == {"BTC-USD": {900: result.manifest.version, 3600: hourly.manifest.version}}
    assert json.loads((root / "latest.json").read_text()) == {
        "format": 2,
        "versions": {"BTC-USD": {"900": result.manifest.version, "3600": hourly.manifest.version}},
    }


def test_sqlite_store_is_a_data_source_equal_to_the_csv(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        import_csv(store, BTC_1H, "BTC-USD", 3600, progress=False)
    from_db = load_candles(tmp_path / "db.sqlite3", "BTC-USD", 3600)
    from_csv = load_candles(BTC_1H, "BTC-USD", 3600)
    np.testing.assert_array_equal(from_db.start, from_csv.start)
    np.testing.assert_allclose(from_db.close, from_csv.close, rtol=0, atol=0)


@pytest.mark.parametrize("granularity", [900, 3600])
@pytest.mark.parametrize("product", ["BTC-USD", "ETH-USD"])
def test_shipped_models_load_and_match_this_build(product: str, granularity: int) -> None:
    """The models a fresh clone's appliance serves verify against their checksums and this feature code,
    passed the gate, and meet the bar: never worse than persistence."""
    manifest = latest(SHIPPED, product, granularity)
    assert manifest is not None, f"no shipped model for {product} at {granularity}s"
    assert manifest.granularity == granularity
    assert manifest.training_data.holdout_start == datetime(2025, 11, 1, tzinfo=UTC)
    assert manifest.gate["passed"] is True
    assert manifest.gate["forced"] is False
    assert set(manifest.models) == {"persistence", "lasso", "cnn"}
    for name, entry in manifest.models.items():
        holdout = entry.metrics["holdout"]
        assert holdout["skill_vs_persistence"] >= -0.002, name  # type: ignore[operator]
        assert holdout["dm_p"] is None or holdout["dm_p"] >= 0.05, name


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
