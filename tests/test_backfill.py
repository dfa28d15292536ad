"""History loading: REST back-fill and CSV import are exact, idempotent and show their work."""

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.candle_csv import read_candle_csv
from appliance.coinbase.rest import CoinbaseRest
from appliance.history import backfill, import_csv
from appliance.replay.server import ReplayServer
from appliance.replay.tape import load_tape
from appliance.store import Store
from tests.conftest import BTC_1H, REPO, SEPT_2025, replay_process


async def test_backfill_reproduces_real_candles_and_is_idempotent(tmp_path: Path) -> None:
    start, end = SEPT_2025
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=start, end=end)
    srv = ReplayServer(trades, start_at_us=end * 1_000_000)  # the clock is at the end: all has happened
    port = await srv.start()
    try:
        async with CoinbaseRest(f"http://127.0.0.1:{port}") as rest:
            store = Store(tmp_path / "db.sqlite3")
            first = await backfill(store, rest, "BTC-USD", 3600, start, end, now=end, progress=False)
            second = await backfill(store, rest, "BTC-USD", 3600, start, end, now=end, progress=False)
            stored = store.candles("BTC-USD", 3600, source="history")
    finally:
        await srv.close()
    real = [c.row() for c in read_candle_csv(BTC_1H) if start <= c.start < end]
    assert first.requests == 3  # 720 hours in windows of at most 300
    assert (first.inserted, second.inserted, second.changed, second.unchanged) == (len(real), 0, 0, len(real))
    assert [(r.start, r.open, r.high, r.low, r.close) for r in stored] == [
        (r.start, r.open, r.high, r.low, r.close) for r in real
    ]
    assert all(abs(a.volume - b.volume) < 1e-9 for a, b in zip(stored, real, strict=True))


async def test_backfill_never_stores_the_candle_still_in_progress(tmp_path: Path) -> None:
    start = SEPT_2025[0]
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=start, end=start + 86400)
    srv = ReplayServer(trades, start_at_us=trades[-1].time_us)
    port = await srv.start()
    try:
        async with CoinbaseRest(f"http://127.0.0.1:{port}") as rest:
            store = Store(tmp_path / "db.sqlite3")
            now = start + 5 * 3600 + 1800  # half-way through the sixth hour
            await backfill(store, rest, "BTC-USD", 3600, start, start + 86400, now=now, progress=False)
            assert [r.start for r in store.candles("BTC-USD", 3600, source="history")][-1] == start + 4 * 3600
    finally:
        await srv.close()


def test_backfill_cli_with_progress_and_rejections(tmp_path: Path) -> None:
    env = {"CRYPTOPI_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    with replay_process(
        [
            "--candles",
            f"BTC-USD={BTC_1H}",
            "--from",
            "2025-09-01",
            "--to",
            "2025-09-08",
            "--start-at",
            "2025-09-08",
        ]
    ) as port:
        env |= {"CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{port}"}
        args = [
            sys.executable,
            "-m",
            "appliance",
            "backfill",
            "--product",
            "BTC-USD",
            "--granularity",
            "3600",
            "--start",
            "2025-09-01",
            "--end",
            "2025-09-08",
        ]
        ok = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        bad = subprocess.run(
            [*args[:7], "120", *args[8:]], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
    assert ok.returncode == 0, ok.stderr
    assert "168 candles from 1 requests: 168 new" in ok.stdout
    assert "0 new, 0 changed, 168 unchanged" in again.stdout
    assert bad.returncode == 1
    assert "granularity 120 is not one Coinbase offers" in bad.stderr


def test_import_csv_is_idempotent(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        first = import_csv(store, BTC_1H, "BTC-USD", 3600, progress=False)
        second = import_csv(store, BTC_1H, "BTC-USD", 3600, progress=False)
        assert first.inserted == 20_600
        assert (second.inserted, second.changed, second.unchanged) == (0, 0, 20_600)
        assert store.candles("BTC-USD", 3600, source="history")[0].close == 42288.06


def test_bad_configuration_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {"CRYPTOPI_PRODUCTS": "BTC-USD,btc usd", "CRYPTOPI_REST_RATE_PER_S": "50", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "ingest"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "CRYPTOPI_PRODUCTS" in out.stdout
    assert "'btc usd' is not a Coinbase product id" in out.stdout
    assert "CRYPTOPI_REST_RATE_PER_S" in out.stdout


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_backfill_exits_non_zero_saying_what_it_stored(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    db = tmp_path / "cryptopi.sqlite3"
    env = {"CRYPTOPI_DATA_DIR": str(tmp_path), "CRYPTOPI_REST_RATE_PER_S": "2", "PATH": "/usr/bin:/bin"}
    with replay_process([f"--candles=BTC-USD={BTC_1H}", "--start-at=2026-05-09"]) as port:  # 69 requests
        env |= {"CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{port}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "backfill", "--product", "BTC-USD", "--start", "2024-01-01",
             "--end", "2026-05-01"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        def stored() -> int:
            try:
                with Store(db, readonly=True) as store:
                    return len(store.candles("BTC-USD", 3600, source="history"))
            except sqlite3.Error:
                return 0

        deadline = time.monotonic() + 60
        while stored() < 600:  # a few requests in, many to go
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backfill stored nothing"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    summary = re.fullmatch(
        rf"interrupted by {sig.name}: (\d+) candles from (\d+) requests: (\d+) new.*\n", out
    )
    assert summary is not None, out
    assert int(summary.group(1)) == int(summary.group(3)) == stored()
    assert int(summary.group(2)) < 69
