"""Storage that fails is an event, not an end: the real ``python -m appliance up`` on real file systems.

Each test makes its trouble for real (root): a small tmpfs filled to the last byte, a read-only bind
mount, an immutable folder, corrupted copies of a real store, a write-ahead log deleted under the
running process. Throughout, the API keeps answering (never a 500), ``/health`` names the problem,
the process never exits; afterwards ingest has resumed by itself, the candles equal the tape and
``PRAGMA integrity_check`` is ``ok``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.candles import Trade, parse_time
from appliance.replay.tape import load_tape
from appliance.store import Store
from tests.conftest import BTC_1H, ETH_1H, appliance, assert_store_matches_tape, replay_process

PRODUCTS = ("BTC-USD", "ETH-USD")
#: Ten days of both products' real hours, about 35 s of replay: long enough to make trouble mid-way.
TEN_DAYS = ("2025-09-01", "2025-09-11")
TAPE_ARGS = ["--candles", f"BTC-USD={BTC_1H}", "--candles", f"ETH-USD={ETH_1H}", "--from", TEN_DAYS[0],
             "--to", TEN_DAYS[1], "--speed", "25000", "--heartbeat-s", "0.2"]  # fmt: skip


@pytest.fixture(scope="module")
def tape() -> list[Trade]:
    start, end = (parse_time(d) for d in TEN_DAYS)
    return load_tape(candles=[("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)], start=start, end=end)


def sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """``mount args... target``, unmounted (lazily, if still busy) however the test ends."""
    target.mkdir(parents=True, exist_ok=True)
    sh("mount", *args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def ingested(db: Path) -> dict[str, int]:
    """Each product's committed last trade id, read as any other program would."""
    try:
        with Store(db, readonly=True) as store:
            return {p: s.last_trade_id for p in PRODUCTS if (s := store.ingest_state(p))}
    except Exception:  # not created yet, or being replaced: nothing committed to read
        return {}


def caught_up(db: Path, tape: list[Trade]) -> bool:
    return ingested(db) == {p: max(t.trade_id for t in tape if t.product == p) for p in PRODUCTS}


def check_store(db: Path, tape: list[Trade]) -> None:
    with Store(db) as store:
        assert store.integrity_check() == "ok"
        assert_store_matches_tape(store, tape, PRODUCTS)


def fill(folder: Path) -> Path:
    """Write a file until the file system has not one byte left."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (65536, 512):  # then the last bytes, to the block
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * chunk)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def test_disk_full_pauses_ingest_and_it_resumes_when_space_is_back(tmp_path: Path, tape: list[Trade]) -> None:
    with (
        mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=8m", "tmpfs") as data,
        replay_process(TAPE_ARGS) as port,
    ):
        db = data / "cryptopi.sqlite3"
        with appliance(data, port, tmp_path / "up.log") as app:
            app.wait(lambda: app.ok("/api/candles/BTC-USD").json(), 60, "the first candles")
            filler = fill(data)
            app.wait(app.storage_problem, 60, "/health to report the full disk")
            assert app.storage_problem() == f"disk full: 0 bytes free on {data}"
            assert app.health()["status"] == "degraded"
            stalled = ingested(db)
            for _ in range(10):  # paused, still answering from what it holds
                app.serves()
                time.sleep(0.3)
            assert ingested(db) == stalled, "commits went on with a full disk"
            filler.unlink()
            app.wait(lambda: app.storage_problem() is None, 30, "the storage problem to clear")
            app.wait(lambda: caught_up(db, tape), 120, "ingest to resume and reach the tape's end")
            app.serves()
            app.stop()
        assert 'msg="storage recovered"' in app.log.read_text()  # the whole log: rounds log a line each
        check_store(db, tape)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store the appliance wrote from the first five of the ten days: candles, history, predictions."""
    folder = tmp_path_factory.mktemp("real")
    args = [*TAPE_ARGS[:6], "--to", "2025-09-06", *TAPE_ARGS[8:]]
    with replay_process(args) as port, appliance(folder, port, folder / "up.log") as app:
        # 15-minute: the five days are too short for the hourly models' window (169 hours).
        app.wait(lambda: app.status("/api/predict", product="ETH-USD", granularity=900) == 200, 90,
                 "a first prediction")  # fmt: skip
        app.wait(lambda: len(ingested(folder / "cryptopi.sqlite3")) == 2, 30, "commits")
        app.stop()
    assert not (folder / "cryptopi.sqlite3-wal").exists(), "a clean stop leaves one file"
    with Store(folder / "cryptopi.sqlite3", readonly=True) as store:
        assert store.predictions("BTC-USD"), "the store holds no predictions"
    return folder / "cryptopi.sqlite3"


def copy_store(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, folder / "cryptopi.sqlite3")
    return folder / "cryptopi.sqlite3"


@pytest.mark.parametrize("how", ["read-only bind mount", "immutable folder", "immutable file"])
def test_a_read_only_store_is_served_and_written_once_writable(
    tmp_path: Path, tape: list[Trade], real_store: Path, how: str
) -> None:
    src = copy_store(real_store, tmp_path / "src")  # one file, as a clean stop leaves it
    stored = ingested(real_store)
    with contextlib.ExitStack() as stack:
        data = src.parent
        if how == "read-only bind mount":
            data = stack.enter_context(mounted(tmp_path / "data", "--bind", str(src.parent)))
            sh("mount", "-o", "remount,bind,ro", str(data))
            make_writable = ["mount", "-o", "remount,bind,rw", str(data)]
            expected = f"data folder is read-only: {data}"
        else:
            locked = src.parent if how == "immutable folder" else src
            sh("chattr", "+i", str(locked))
            stack.callback(subprocess.run, ["chattr", "-i", str(locked)], capture_output=True)
            make_writable = ["chattr", "-i", str(locked)]
            expected = f"{'data folder' if locked == data else 'database file'} is read-only: {locked}"
        port = stack.enter_context(replay_process(TAPE_ARGS))
        app = stack.enter_context(appliance(data, port, tmp_path / "up.log"))
        app.wait(app.storage_problem, 30, "/health to report the read-only store")
        assert app.storage_problem() == expected
        for _ in range(10):  # no crash, no loop: serving what the store holds
            app.serves()
            time.sleep(0.5)
        sh(*make_writable)
        app.wait(lambda: app.storage_problem() is None, 30, "the storage problem to clear")
        app.wait(lambda: caught_up(src, tape), 120, "ingest to resume and reach the tape's end")
        app.stop()
    assert ingested(real_store) == stored
    check_store(src, tape)


def garbage_page(db: Path, page: int) -> None:
    with db.open("r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(os.urandom(4096))


@pytest.mark.parametrize("damage", ["truncated", "garbage page", "garbage header"])
def test_a_corrupt_store_is_kept_aside_and_replaced_by_a_back_filled_one(
    tmp_path: Path, tape: list[Trade], real_store: Path, damage: str
) -> None:
    db = copy_store(real_store, tmp_path / "data")
    with Store(db, readonly=True) as store:
        predictions = sum(len(store.predictions(p)) for p in PRODUCTS)
        # a page surely in use, of a table that is not the predictions'
        (history_root,) = store._db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'history_candles'"
        ).fetchone()
    if damage == "truncated":
        os.truncate(db, db.stat().st_size // 2)
    else:
        garbage_page(db, history_root if damage == "garbage page" else 1)
    corrupted = hashlib.sha256(db.read_bytes()).hexdigest()
    with replay_process(TAPE_ARGS) as port, appliance(db.parent, port, tmp_path / "up.log") as app:
        app.wait(app.incidents, 30, "/health to report the corrupt file")
        (incident,) = app.incidents()
        (aside,) = db.parent.glob("cryptopi-corrupt-*.sqlite3")
        assert incident.startswith(f"database file was corrupt: moved aside to {aside.name}, a fresh store")
        if damage == "garbage page":  # the predictions table is still readable: they are counted
            assert incident.endswith(f"{predictions} predictions kept in it are lost"), incident
        else:
            assert "predictions kept in it are lost" in incident
        assert hashlib.sha256(aside.read_bytes()).hexdigest() == corrupted, "the corrupt file was changed"
        app.wait(lambda: caught_up(db, tape), 120, "the fresh store to reach the tape's end")
        app.wait(lambda: app.status("/api/predict", product="BTC-USD", granularity=900) == 200, 30,
                 "predictions from the back-filled store")  # fmt: skip
        assert app.storage_problem() is None
        app.serves()
        app.stop()
    with Store(db, readonly=True) as store:
        assert store.candles("BTC-USD", 3600, source="history"), "history was not back-filled"
    check_store(db, tape)


def test_a_deleted_write_ahead_log_is_folded_back_without_a_500(tmp_path: Path, tape: list[Trade]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "cryptopi.sqlite3"
    with replay_process(TAPE_ARGS) as port, appliance(data, port, tmp_path / "up.log") as app:
        app.wait(lambda: len(ingested(db)) == 2, 60, "the first commits")
        (data / "cryptopi.sqlite3-wal").unlink()
        deadline = time.monotonic() + 15
        while not app.incidents():  # the API is asked all along
            assert time.monotonic() < deadline, app.tail()
            app.serves()
        (incident,) = app.incidents()
        assert incident.startswith("write-ahead log cryptopi.sqlite3-wal was deleted while in use")
        assert (data / "cryptopi.sqlite3-wal").exists()
        for _ in range(5):
            app.serves()
        app.wait(lambda: caught_up(db, tape), 120, "ingest to reach the tape's end")
        app.stop()
    check_store(db, tape)
