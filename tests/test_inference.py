"""Serving: the shipped models through the appliance's own path reproduce training's hold-out figures."""

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.features import WINDOW, CandleSeries, MissingHistory
from appliance.inference import Inference
from appliance.registry import latest_versions, set_latest
from tests.conftest import REPO, MetricDelta

SHIPPED = REPO / "appliance" / "models"
HOLDOUT = 1761955200  # 2025-11-01


def window(s: CandleSeries, end: int) -> CandleSeries:
    lo = max(0, end - WINDOW + 1)
    return CandleSeries(s.granularity, s.start[lo : end + 1], s.open[lo : end + 1], s.high[lo : end + 1],
                        s.low[lo : end + 1], s.close[lo : end + 1], s.volume[lo : end + 1])  # fmt: skip


def test_serving_reproduces_the_manifest_holdout_mae(btc_hourly: CandleSeries) -> None:
    inference = Inference(SHIPPED, ("BTC-USD",))
    assert inference.reload()
    manifest = inference.serving["BTC-USD"].manifest
    close_at = dict(zip(btc_hourly.start.tolist(), btc_hourly.close.tolist(), strict=True))
    errors: dict[str, list[float]] = {name: [] for name in manifest.models}
    inside: dict[str, int] = dict.fromkeys(manifest.models, 0)
    for i in np.flatnonzero(btc_hourly.start + 3600 >= HOLDOUT):
        target = close_at.get(int(btc_hourly.start[i]) + 3600)
        if target is None:
            continue
        try:
            predictions = inference.predict("BTC-USD", window(btc_hourly, int(i)))
        except MissingHistory:
            continue
        for p in predictions:
            errors[p.model].append(abs(p.predicted_close - target))
            inside[p.model] += p.lower_80 <= target <= p.upper_80
    for name, entry in manifest.models.items():
        holdout = entry.metrics["holdout"]
        assert len(errors[name]) == holdout["rows"]
        assert np.mean(errors[name]) == pytest.approx(holdout["mae"], rel=1e-6), name
        assert inside[name] / len(errors[name]) == pytest.approx(holdout["coverage_80"], abs=1e-9), name


def test_new_versions_swap_in_and_broken_ones_are_refused(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED, tmp_path, dirs_exist_ok=True)
    inference = Inference(tmp_path, ("BTC-USD",))
    assert inference.reload()
    first = inference.serving["BTC-USD"].manifest.version
    assert not inference.reload()  # nothing new

    good = "btc-usd-3600s-good-copy"
    shutil.copytree(tmp_path / first, tmp_path / good)
    set_latest(tmp_path, "BTC-USD", good)
    assert inference.reload()
    assert inference.serving["BTC-USD"].manifest.version == first  # same manifest content, new folder
    assert latest_versions(tmp_path)["BTC-USD"] == good

    broken = "btc-usd-3600s-broken"
    shutil.copytree(tmp_path / first, tmp_path / broken)
    (tmp_path / broken / "cnn.onnx").write_bytes(b"not a model")
    set_latest(tmp_path, "BTC-USD", broken)
    grown = MetricDelta()
    assert not inference.reload()
    assert grown("cryptopi_model_refused_total", product="BTC-USD") == 1
    assert inference.serving["BTC-USD"].models["cnn"].log_return(np.zeros(69)) == pytest.approx(
        inference.serving["BTC-USD"].models["cnn"].log_return(np.zeros(69))
    )  # still serving, still runs

    (tmp_path / "latest.json").write_text(json.dumps({"BTC-USD": 5}))
    assert not inference.reload()  # an unreadable pointer is logged, never raised
    assert "BTC-USD" in inference.serving


async def test_the_predictor_stops_when_cancelled_as_it_is_woken(tmp_path: Path) -> None:
    """A commit's wake and the shutdown's cancel in the same loop tick (SIGTERM under load): it stops."""
    from appliance.predictor import Predictor
    from appliance.store import Store

    with Store(tmp_path / "db.sqlite3") as store:
        predictor = Predictor(store, Inference(SHIPPED, ("BTC-USD",)))
        task = asyncio.create_task(predictor.run())
        await asyncio.sleep(0.01)
        predictor.wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)  # generous: a stuck task never finishes
        assert done == {task}
        assert task.cancelled()
