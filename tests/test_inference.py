"""Serving: the shipped models through the appliance's own path reproduce training's hold-out figures."""

import asyncio
import contextlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from appliance import predictor as predictor_module
from appliance.features import WINDOW, CandleSeries, MissingHistory
from appliance.inference import Inference
from appliance.predictor import Predictor
from appliance.registry import latest_versions, set_latest
from appliance.store import Store
from tests.conftest import BTC_1H, BTC_15M, ETH_1H, ETH_15M, REPO, MetricDelta, wait_for
from training.data import build_dataset, load_candles
from training.evaluate import bounds
from training.export import OnnxPredictor

SHIPPED = REPO / "appliance" / "models"
V1_MANIFEST = REPO / "tests" / "data" / "manifest_features_v1.json"
HOLDOUT = 1761955200  # 2025-11-01
#: How far (relative) an int8 graph's hold-out MAE may move between CPUs (seen: 0.15 % for ETH-USD's
#: 15-minute CNN on an AVX2 x86 against the VNNI machine that trained it).
INT8_ACROSS_CPUS = 0.005
DATA = {
    ("BTC-USD", 3600): BTC_1H,
    ("ETH-USD", 3600): ETH_1H,
    ("BTC-USD", 900): BTC_15M,
    ("ETH-USD", 900): ETH_15M,
}


def window(s: CandleSeries, end: int) -> CandleSeries:
    lo = max(0, end - WINDOW + 1)
    return CandleSeries(s.granularity, s.start[lo : end + 1], s.open[lo : end + 1], s.high[lo : end + 1],
                        s.low[lo : end + 1], s.close[lo : end + 1], s.volume[lo : end + 1])  # fmt: skip


@pytest.mark.parametrize(("product", "granularity"), list(DATA))
def test_serving_reproduces_the_manifest_holdout_metrics(product: str, granularity: int) -> None:
    series = load_candles(DATA[product, granularity], product, granularity)
    inference = Inference(SHIPPED, (product,), (granularity,))
    assert inference.reload()
    loaded = inference.serving_of(product, granularity)
    assert loaded is not None
    manifest = loaded.manifest
    assert set(manifest.models) == {"persistence", "lasso", "cnn"}
    g = granularity
    close_at = dict(zip(series.start.tolist(), series.close.tolist(), strict=True))
    errors: dict[str, list[float]] = {name: [] for name in manifest.models}
    inside: dict[str, dict[str, int]] = {name: {"80": 0, "95": 0} for name in manifest.models}
    for i in np.flatnonzero(series.start + g >= HOLDOUT):
        target = close_at.get(int(series.start[i]) + g)
        if target is None:
            continue
        try:
            predictions = inference.predict(product, window(series, int(i)))
        except MissingHistory:
            continue
        for p in predictions:
            assert p.granularity == g
            assert p.target_time == p.as_of + g
            errors[p.model].append(abs(p.predicted_close - target))
            inside[p.model]["80"] += p.lower_80 <= target <= p.upper_80
            inside[p.model]["95"] += p.lower_95 <= target <= p.upper_95
    test = build_dataset(series, product).split_at(HOLDOUT)[1]
    for name, entry in manifest.models.items():
        holdout = entry.metrics["holdout"]
        n = len(errors[name])
        assert n == holdout["rows"] == len(test)
        if not entry.int8:
            assert np.mean(errors[name]) == pytest.approx(holdout["mae"], rel=1e-6), name
            for level in ("80", "95"):
                assert inside[name][level] / n == pytest.approx(holdout[f"coverage_{level}"], abs=1e-9), name
            continue
        # An int8 graph's integer kernels are the CPU's: on x86 without VNNI (AVX2) u8 x s8 products
        # saturate in pairs, where a VNNI or ARM core (the Pi's) does not. Serving must still equal
        # training's own evaluation of the same graph run here, row by row; the manifest's figures,
        # computed where the version was trained, hold within what the kernels make of it.
        assert entry.file is not None
        here = entry.shrink * OnnxPredictor(SHIPPED / manifest.version / entry.file, name).predict(test.X)
        assert np.mean(errors[name]) == pytest.approx(
            np.mean(np.abs(test.close * np.exp(here) - test.target)), rel=1e-9
        )
        assert np.mean(errors[name]) == pytest.approx(holdout["mae"], rel=INT8_ACROSS_CPUS), name
        sigma = np.array([loaded.sigma(x) for x in test.X])
        for level, q in (("80", "0.8"), ("95", "0.95")):
            lo, hi = bounds(test, here, entry.intervals.quantiles[q] * sigma)
            assert inside[name][level] == np.count_nonzero((test.target >= lo) & (test.target <= hi)), name
            assert inside[name][level] / n == pytest.approx(
                holdout[f"coverage_{level}"], abs=INT8_ACROSS_CPUS
            )
    # Persistence is served as a model: the last close, with an interval; the others' skill is against it.
    lasso = manifest.models["lasso"].metrics["holdout"]
    assert lasso["skill_vs_persistence"] == pytest.approx(
        1 - np.mean(errors["lasso"]) / np.mean(errors["persistence"])
    )


def test_new_versions_swap_in_and_broken_ones_are_refused(tmp_path: Path, btc_hourly: CandleSeries) -> None:
    shutil.copytree(SHIPPED, tmp_path, dirs_exist_ok=True)
    inference = Inference(tmp_path, ("BTC-USD",), (900, 3600))
    assert inference.reload()
    hourly, quarter = inference.serving_of("BTC-USD", 3600), inference.serving_of("BTC-USD", 900)
    assert hourly is not None
    assert quarter is not None
    assert (hourly.manifest.granularity, quarter.manifest.granularity) == (3600, 900)
    first = hourly.manifest.version
    assert not inference.reload()  # nothing new

    good = "btc-usd-3600s-good-copy"
    shutil.copytree(tmp_path / first, tmp_path / good)
    set_latest(tmp_path, "BTC-USD", 3600, good)
    assert inference.reload()
    assert inference.serving[("BTC-USD", 3600)].manifest.version == first  # same manifest, new folder
    assert latest_versions(tmp_path)["BTC-USD"][3600] == good

    serving = inference.serving[("BTC-USD", 3600)]
    recent = window(btc_hourly, int(np.searchsorted(btc_hourly.start, HOLDOUT + 180 * 86400)))
    before = [(p.model, p.predicted_close) for p in inference.predict("BTC-USD", recent)]
    broken = "btc-usd-3600s-broken"
    shutil.copytree(tmp_path / first, tmp_path / broken)
    (tmp_path / broken / "volatility.onnx").write_bytes(b"not a model")
    set_latest(tmp_path, "BTC-USD", 3600, broken)
    grown = MetricDelta()
    assert not inference.reload()
    assert grown("cryptopi_model_refused_total", product="BTC-USD") == 1
    # The loaded set stays, whole, and still predicts what it predicted before the broken version came.
    assert inference.serving[("BTC-USD", 3600)] is serving
    assert serving.manifest.version == first
    assert [(p.model, p.predicted_close) for p in inference.predict("BTC-USD", recent)] == before
    assert {m for m, _ in before} == {"lasso", "cnn", "persistence"}
    assert inference.serving_of("BTC-USD", 900) is quarter  # the other horizon untouched

    (tmp_path / "latest.json").write_text(json.dumps({"format": 2, "versions": {"BTC-USD": {"3600": 5}}}))
    assert not inference.reload()  # an unreadable pointer is logged, never raised
    assert inference.serving_of("BTC-USD") is serving


def test_a_version_trained_on_spec_v1_is_refused_naming_both_specs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An old registry (format-1 latest.json, a spec-v1 version) is read and refused, never served."""
    version = "btc-usd-3600s-20261121t1607z-37f1e62e"
    (tmp_path / version).mkdir()
    shutil.copy(V1_MANIFEST, tmp_path / version / "manifest.json")
    (tmp_path / "latest.json").write_text(json.dumps({"BTC-USD": version}))
    inference = Inference(tmp_path, ("BTC-USD",))
    grown = MetricDelta()
    assert not inference.reload()
    assert inference.serving_of("BTC-USD") is None
    assert grown("cryptopi_model_refused_total", product="BTC-USD") == 1
    refused = [r for r in caplog.records if r.getMessage() == "model version refused"]
    assert refused
    error = refused[-1].__dict__["error"]
    assert "cryptopi-features-v1" in error
    assert "cryptopi-features-v2" in error


def test_a_pooled_version_serves_any_product_without_its_own(tmp_path: Path) -> None:
    """The ``*`` product key (issue #12's pooled models): used where a product has no version."""
    shutil.copytree(SHIPPED, tmp_path, dirs_exist_ok=True)
    btc = latest_versions(tmp_path)["BTC-USD"][3600]
    pooled = "any-3600s-pooled"
    shutil.copytree(tmp_path / btc, tmp_path / pooled)
    doc = json.loads((tmp_path / pooled / "manifest.json").read_text())
    (tmp_path / pooled / "manifest.json").write_text(json.dumps(doc | {"product": "*"}))
    (tmp_path / "latest.json").write_text(json.dumps({"format": 2, "versions": {
        "*": {"3600": pooled}, "BTC-USD": {"3600": btc}}}))  # fmt: skip
    inference = Inference(tmp_path, ("BTC-USD", "ETH-USD"))
    assert inference.reload()
    eth, own = inference.serving_of("ETH-USD"), inference.serving_of("BTC-USD")
    assert eth is not None
    assert own is not None
    assert (eth.manifest.product, own.manifest.product) == ("*", "BTC-USD")
    eth_hours = load_candles(ETH_1H, "ETH-USD", 3600)
    may_day = int(np.searchsorted(eth_hours.start, 1777593600))  # 2026-05-01, a whole window before it
    assert {p.model_version for p in inference.predict("ETH-USD", window(eth_hours, may_day))} == {
        eth.manifest.version
    }


async def test_new_versions_are_checked_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing and loading a version happens in a worker thread: the API and ingest keep running."""
    inference = Inference(SHIPPED, ("BTC-USD",))
    threads: list[threading.Thread] = []

    def reload() -> bool:
        threads.append(threading.current_thread())
        return False

    monkeypatch.setattr(inference, "reload", reload)
    monkeypatch.setattr(predictor_module, "RELOAD_EVERY_S", 0.0)
    predictor = Predictor(Store(":memory:"), inference)
    task = asyncio.ensure_future(predictor.run())
    try:
        predictor.wake.set()
        await wait_for(lambda: bool(threads), 10, "a reload")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert threads[0] is not threading.main_thread()


async def test_the_predictor_stops_when_cancelled_as_it_is_woken(tmp_path: Path) -> None:
    """A commit's wake and the shutdown's cancel in the same loop tick (SIGTERM under load): it stops."""
    with Store(tmp_path / "db.sqlite3") as store:
        predictor = Predictor(store, Inference(SHIPPED, ("BTC-USD",)))
        task = asyncio.create_task(predictor.run())
        await asyncio.sleep(0.01)
        predictor.wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)  # generous: a stuck task never finishes
        assert done == {task}
        assert task.cancelled()
