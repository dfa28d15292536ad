"""Upgrades: a store written by an earlier release (schema 2, and schema 3 as shipped with the 15-minute
horizon) upgrades in place, with all of its data, and ingest goes on from its cursors; a store written
by a newer release is refused with a clear message and left byte-identical, by the one-shot commands
and by the running appliance alike."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.candles import US, parse_time
from appliance.coinbase.rest import CoinbaseRest
from appliance.ingest import Ingester
from appliance.replay.server import ReplayServer
from appliance.replay.tape import load_tape
from appliance.store import MIGRATIONS, Store, StoreRefused
from tests.conftest import BTC_1H, ETH_1H, REPO, appliance, assert_store_matches_tape, make_settings, wait_for

#: Written by commits ea3ef63 (schema 2) and c2bb9f5 (schema 3)'s own appliance (tests/data/SOURCES.md).
EARLIER = {
    2: REPO / "tests" / "data" / "store_schema2_ea3ef63.sqlite3",
    3: REPO / "tests" / "data" / "store_schema3_c2bb9f5.sqlite3",
}
PRODUCTS = ("BTC-USD", "ETH-USD")
COLUMNS = {  # every column, named: the upgrade may reorder a table's key, never its data
    "trade_candles": "product, granularity, start, open, high, low, close, volume_e8, trades",
    "history_candles": "product, granularity, start, open, high, low, close, volume, source",
    "ingest_state": "product, first_trade_id, last_trade_id, last_trade_time_us, first_trade_time_us",
    "predictions": "product, model, as_of, model_version, granularity, target_time, last_close,"
    " predicted_close, lower_80, upper_80, lower_95, upper_95, created_at, realized_close",
}


Row = tuple[Any, ...]  # a table's row, as sqlite3 gives it


def contents(db: Path) -> dict[str, set[Row]]:
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {t: set(raw.execute(f"SELECT {cols} FROM {t}")) for t, cols in COLUMNS.items()}
    finally:
        raw.close()


def schema_version(db: Path) -> int:
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(raw.execute("PRAGMA user_version").fetchone()[0])
    finally:
        raw.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=sorted(EARLIER), ids=lambda v: f"schema{v}")
def previous(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    db = tmp_path / "cryptopi.sqlite3"
    shutil.copy(EARLIER[request.param], db)
    assert schema_version(db) == request.param
    return db


def quarters_of(minutes: set[Row]) -> set[Row]:
    """The 15-minute trade candles the minute ones add up to (rows as in ``COLUMNS``), by hand."""
    groups: dict[tuple[object, int], list[Row]] = {}
    for row in sorted(minutes, key=lambda r: (r[0], r[2])):
        groups.setdefault((row[0], row[2] // 900 * 900), []).append(row)
    return {(product, 900, start, rows[0][3], max(r[4] for r in rows), min(r[5] for r in rows), rows[-1][6],
             sum(r[7] for r in rows), sum(r[8] for r in rows))
            for (product, start), rows in groups.items()}  # fmt: skip


def test_a_store_of_an_earlier_release_upgrades_in_place_with_its_data(previous: Path) -> None:
    before = contents(previous)
    assert all(before.values()), "the fixture should hold every kind of row"
    minutes = {r for r in before["trade_candles"] if r[1] == 60}
    with Store(previous) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.integrity_check() == "ok"
        assert len(store.series_rows("BTC-USD", 3600, last=48)) == 48
        # Schema 2 had no 15-minute history: the quarters the tape's sparse trades missed stay holes
        # for the history keeper to fill over REST; every other quarter is served from the rebuild.
        assert {r.start for r in store.series_rows("BTC-USD", 900)} >= {
            r[2] for r in quarters_of(minutes) if r[0] == "BTC-USD"
        } - {max(r[2] for r in quarters_of(minutes) if r[0] == "BTC-USD")}  # the newest is still open
        assert any(p.realized_close for p in store.predictions("ETH-USD"))
        # Made before calibrations were recorded: with their version's own quantiles from training.
        made = store.predictions("BTC-USD")
        assert {(p.calibration, p.calibrated_at) for p in made} == {("training", None)}
    after = contents(previous)
    # Every row kept; the 15-minute trade candles are the minutes' sums (schema 2 had none; schema 3's
    # were built by ingest from the same trades, so they come out the same).
    assert {t: rows for t, rows in after.items() if t != "trade_candles"} == {
        t: rows for t, rows in before.items() if t != "trade_candles"
    }
    kept = [{r for r in c["trade_candles"] if r[1] != 900} for c in (before, after)]
    assert kept[0] == kept[1]
    assert {r for r in after["trade_candles"] if r[1] == 900} == quarters_of(minutes)
    with Store(previous) as store:  # opening it again migrates nothing
        assert store.schema_version == len(MIGRATIONS)
    assert contents(previous) == after


async def test_ingest_goes_on_from_an_upgraded_stores_cursors(previous: Path, running) -> None:
    # The market the fixture was written from (the same tape, the same trade ids), carried on.
    tape = load_tape(candles=[("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)], start=parse_time("2026-03-20"),
                     end=parse_time("2026-05-01"))  # fmt: skip
    cursors = contents(previous)["ingest_state"]
    server = ReplayServer(tape, start_at_us=parse_time("2026-04-20T00:30:00Z") * US, heartbeat_s=0.2)
    port = await server.start()
    try:
        settings = make_settings(previous.parent, port)
        store = Store(settings.db_path)
        async with CoinbaseRest(settings.coinbase_rest_url) as rest:
            running(Ingester(settings, store, rest).run())
            last = {p: max(t.trade_id for t in tape if t.product == p) for p in PRODUCTS}
            await wait_for(lambda: all((s := store.ingest_state(p)) and s.last_trade_id == last[p]
                                       for p in PRODUCTS), 120, "ingest to reach the tape's end")  # fmt: skip
    finally:
        await server.close()
    with Store(previous, readonly=True) as reader:
        assert {(s.product, s.first_trade_id) for s in map(reader.ingest_state, PRODUCTS) if s} == {
            (c[0], c[1]) for c in cursors
        }  # the same coverage, carried on
        assert_store_matches_tape(reader, tape, PRODUCTS)
        assert reader.integrity_check() == "ok"


def test_a_store_of_a_newer_release_is_refused_and_left_untouched(previous: Path, tmp_path: Path) -> None:
    Store(previous).close()
    raw = sqlite3.connect(previous)
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()
    digest = sha256(previous)
    refusal = (f"cryptopi.sqlite3 was written by a newer release (schema {len(MIGRATIONS) + 1}; this "
               f"release knows up to {len(MIGRATIONS)}): left untouched")  # fmt: skip
    with pytest.raises(StoreRefused) as refused:
        Store(previous)
    assert str(refused.value) == refusal

    env = os.environ | {"CRYPTOPI_DATA_DIR": str(previous.parent)}
    command = [sys.executable, "-m", "appliance", "import-csv", str(BTC_1H), "--product", "BTC-USD",
               "--granularity", "3600"]  # fmt: skip
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (1, f"error: {refusal}\n")

    # The appliance stays up, says why it does nothing, and never writes a byte.
    with appliance(previous.parent, 9, tmp_path / "up.log") as app:  # port 9: no Coinbase needed
        app.wait(app.storage_problem, 30, "/health to name the refused store")
        assert app.storage_problem() == refusal
        answer = app.get("/api/candles/BTC-USD")
        assert answer is not None
        assert (answer.status_code, answer.json()) == (503, {"detail": f"storage unavailable: {refusal}"})
        app.stop()
    assert sha256(previous) == digest
