"""Power-cut safety: SIGKILL the ingesting process again and again; the candles stay exact."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from appliance.store import Store
from tests.conftest import MONTH_TAPE_ARGS, REPO, assert_store_matches_tape, replay_process

PRODUCTS = ("BTC-USD", "ETH-USD")
KILLS = 12


def start_ingester(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "CRYPTOPI_DATA_DIR": str(tmp_path),
        "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{port}",
        "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{port}",
        "CRYPTOPI_FEED_WATCHDOG_S": "1",
        "CRYPTOPI_RECONNECT_MAX_S": "0.5",
        "CRYPTOPI_COMMIT_INTERVAL_S": "0.2",
    }
    log = (tmp_path / "ingest.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "ingest"], env=env, cwd=REPO, stdout=log, stderr=log
    )


def committed(tmp_path: Path) -> int:
    db = tmp_path / "cryptopi.sqlite3"
    if not db.exists():
        return 0
    try:
        with Store(db, readonly=True) as store:
            return sum(s.last_trade_id for p in PRODUCTS if (s := store.ingest_state(p)))
    except sqlite3.OperationalError:  # killed after creating the file, before its first migration
        return 0


def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path: Path, month_tape) -> None:
    rng = random.Random(2)
    last_ids = {p: max(t.trade_id for t in month_tape if t.product == p) for p in PRODUCTS}
    # A month of market in about 25 s of real time, faults on, so the kills land mid-stream.
    args = [
        *MONTH_TAPE_ARGS,
        "--speed",
        "100000",
        "--heartbeat-s",
        "0.2",
        "--omit-rate",
        "0.01",
        "--duplicate-rate",
        "0.01",
        "--malformed-every",
        "97",
        "--drop-every",
        "900",
    ]
    progress = []
    with replay_process(args) as port:
        for _ in range(KILLS):
            before = committed(tmp_path)
            proc = start_ingester(tmp_path, port)
            # Kill only once this ingester has committed something of its own, at a random moment
            # after: on a loaded machine its start alone can take longer than any fixed sleep.
            started = time.monotonic() + 60
            while committed(tmp_path) == before and time.monotonic() < started:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            progress.append(committed(tmp_path))
        log = tmp_path / "ingest.log"
        subscribed = log.read_text().count("feed subscribed")
        proc = start_ingester(tmp_path, port)
        deadline = time.monotonic() + 120
        while log.read_text().count("feed subscribed") == subscribed:  # its signal handlers are set
            assert time.monotonic() < deadline, "the last ingester never subscribed"
            time.sleep(0.1)
        while committed(tmp_path) != sum(last_ids.values()):
            assert time.monotonic() < deadline, "the last ingester never caught up"
            assert proc.poll() is None, (tmp_path / "ingest.log").read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0

    # The kills really landed while trades were flowing, not before or after.
    assert len(set(progress)) >= KILLS // 2, progress
    assert progress[-1] < sum(last_ids.values())
    with Store(tmp_path / "cryptopi.sqlite3") as store:
        assert store.integrity_check() == "ok"
        assert_store_matches_tape(store, month_tape, PRODUCTS)
