"""The SQLite store: migrations, WAL, atomic commits, idempotent history, retention."""

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.candles import Candle, CandleRow, IngestState
from appliance.predictions import Accuracy, PredictionRow
from appliance.store import MIGRATIONS, Store, TradeCommit


def commit(store: Store, deltas: dict[tuple[int, int], Candle], **cursor: int) -> None:
    """One BTC-USD commit: candle deltas and the cursor (first/last trade id and time)."""
    store.commit_trades([TradeCommit("BTC-USD", deltas, **cursor)])


def test_fresh_database_is_migrated_and_in_wal(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.integrity_check() == "ok"
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data_and_does_not_remigrate(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        commit(
            store,
            {(60, 0): Candle(1, 2, 1, 2, 10, 2)},
            first_trade_id=1,
            last_trade_id=2,
            last_trade_time_us=5,
        )
    with Store(tmp_path / "db.sqlite3") as store:
        assert store.ingest_state("BTC-USD").last_trade_id == 2  # type: ignore[union-attr]
        assert store.trade_candle_deltas("BTC-USD", 60) == {0: Candle(1, 2, 1, 2, 10, 2)}


def test_commits_merge_deltas_and_move_the_cursor(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        commit(
            store,
            {(60, 0): Candle(10, 12, 9, 11, 5, 3)},
            first_trade_id=1,
            last_trade_id=3,
            last_trade_time_us=1,
        )
        commit(
            store,
            {(60, 0): Candle(8, 8, 7, 7.5, 2, 1), (60, 60): Candle(7, 7, 7, 7, 1, 1)},
            first_trade_id=1,
            last_trade_id=5,
            last_trade_time_us=2,
        )
        assert store.trade_candle_deltas("BTC-USD", 60) == {
            0: Candle(10, 12, 7, 7.5, 7, 4),
            60: Candle(7, 7, 7, 7, 1, 1),
        }
        state = store.ingest_state("BTC-USD")
        assert (state.first_trade_id, state.last_trade_id) == (1, 5)  # type: ignore[union-attr]


def test_a_failed_commit_leaves_nothing_behind(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        bad = {
            (60, 0): Candle(1, 1, 1, 1, 1, 1),
            (60, 60): Candle(1, 1, 1, 1, 0, 1),
        }  # volume 0 violates CHECK
        with pytest.raises(sqlite3.IntegrityError):
            commit(store, bad, first_trade_id=1, last_trade_id=2, last_trade_time_us=1)
        assert store.trade_candle_deltas("BTC-USD", 60) == {}
        assert store.ingest_state("BTC-USD") is None


def test_history_upsert_is_idempotent_and_counts_corrections(tmp_path: Path) -> None:
    rows = [CandleRow(3600 * i, 1.0 + i, 2.0 + i, 0.5 + i, 1.5 + i, 10.0) for i in range(5)]
    with Store(tmp_path / "db.sqlite3") as store:
        first = store.upsert_history("BTC-USD", 3600, rows, "test")
        again = store.upsert_history("BTC-USD", 3600, rows, "test")
        fixed = store.upsert_history("BTC-USD", 3600, [CandleRow(0, 1.0, 2.0, 0.5, 1.5, 11.0)], "test")
        assert (first.inserted, first.changed, first.unchanged) == (5, 0, 0)
        assert (again.inserted, again.changed, again.unchanged) == (0, 0, 5)
        assert (fixed.inserted, fixed.changed) == (0, 1)
        assert store.candles("BTC-USD", 3600, source="history")[0].volume == 11.0
        assert [r.start for r in store.candles("BTC-USD", 3600, source="history", start=3600, end=10800)] == [
            3600,
            7200,
        ]


def test_retention_is_measured_from_the_newest_candle(tmp_path: Path) -> None:
    day = 86400
    with Store(tmp_path / "db.sqlite3") as store:
        deltas = {(60, s): Candle(1, 1, 1, 1, 1, 1) for s in (0, day, 10 * day)}
        deltas[(3600, 0)] = Candle(1, 1, 1, 1, 3, 3)
        commit(store, deltas, first_trade_id=1, last_trade_id=3, last_trade_time_us=1)
        assert store.prune_trade_candles(60, 5 * day) == 2
        assert list(store.trade_candle_deltas("BTC-USD", 60)) == [10 * day]
        assert list(store.trade_candle_deltas("BTC-USD", 3600)) == [0]  # hourly candles are kept


def test_readers_are_not_blocked_by_an_open_write(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with Store(path) as writer:
        commit(
            writer,
            {(60, 0): Candle(1, 1, 1, 1, 1, 1)},
            first_trade_id=1,
            last_trade_id=1,
            last_trade_time_us=1,
        )
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("UPDATE ingest_state SET last_trade_id = 99")  # uncommitted write in progress
        seen: list[IngestState | None] = []
        reader = threading.Thread(
            target=lambda: seen.append(Store(path, readonly=True).ingest_state("BTC-USD"))
        )
        reader.start()
        reader.join(2)
        raw.execute("ROLLBACK")
        assert [s.last_trade_id if s else None for s in seen] == [1]


def test_series_uses_trade_candles_only_from_the_first_whole_bucket(tmp_path: Path) -> None:
    """Ingest that began mid-hour built a partial candle for that hour: history stands in for it."""
    h, us = 3600, 1_000_000
    with Store(tmp_path / "db.sqlite3") as store:
        store.upsert_history(
            "BTC-USD", h, [CandleRow(s * h, 10.0, 11.0, 9.0, 10.0, 5.0) for s in range(5)], "rest"
        )
        trade_buckets = {(h, s * h): Candle(20.0, 21.0, 19.0, 20.0, 100, 3) for s in (2, 3, 4, 5)}
        commit(
            store,
            trade_buckets,
            first_trade_id=1,
            last_trade_id=12,
            last_trade_time_us=5 * h * us + 10,
            first_trade_time_us=2 * h * us + 1800 * us,
        )
        rows = store.series_rows("BTC-USD", h)
    # Hour 2 began before ingest did (history's), 3-4 are whole (trades'), 5 may be open (left out).
    assert [(r.start // h, r.close) for r in rows] == [(0, 10.0), (1, 10.0), (2, 10.0), (3, 20.0), (4, 20.0)]


def test_a_window_of_trade_candles_reads_its_own_product_among_fifty(tmp_path: Path) -> None:
    """Trade candles are keyed time first; a bounded read (a lookup a bucket) and an open-ended one (a
    range scan) both return exactly one product's candles, with holes left as holes."""
    h, us = 3600, 1_000_000
    products = [f"P{i:02d}-USD" for i in range(50)]
    with Store(tmp_path / "db.sqlite3") as store:
        store.commit_trades([
            TradeCommit(p, {(h, s * h): Candle(10.0 + i, 11.0 + i, 9.0, 10.0 + i, 100, 1)
                            for s in range(10) if (s, i) != (4, 7)}, 1, 9, 9 * h * us + 5, 0)
            for i, p in enumerate(products)
        ])  # fmt: skip
        everything = store.candles("P07-USD", h)
        assert [(r.start // h, r.close) for r in everything] == [(s, 17.0) for s in range(10) if s != 4]
        assert store.candles("P07-USD", h, start=2 * h - 1, end=7 * h) == everything[2:6]  # aligned up
        assert store.candles("P07-USD", h, start=7 * h, end=7 * h) == []
        assert store.candles("P07-USD", h, start=9 * h, end=10**10) == everything[-1:]
        window = store.series_rows("P07-USD", h, last=3)  # the open hour 9 left out
        assert [r.start // h for r in window] == [6, 7, 8]


def test_predictions_are_kept_once_and_realized_later(tmp_path: Path) -> None:
    def row(model: str, as_of: int, predicted: float) -> PredictionRow:
        return PredictionRow("BTC-USD", model, as_of, "v1", 3600, as_of + 3600, 100.0, predicted,
                             99.0, 101.0, 98.0, 102.0, 0.0)  # fmt: skip

    with Store(tmp_path / "db.sqlite3") as store:
        assert store.save_predictions([row("lasso", 7200, 100.5), row("cnn", 7200, 99.5)]) == 2
        assert store.save_predictions([row("lasso", 7200, 555.0)]) == 0  # never rewritten
        store.save_predictions([row("lasso", 10800, 101.0)])
        assert [(p.model, p.as_of) for p in store.latest_predictions("BTC-USD")] == [
            ("cnn", 7200),
            ("lasso", 10800),
        ]
        # the candle 7200..10800 closed at 100.7
        assert store.realize({("BTC-USD", 3600): {7200: 100.7}}) == {("BTC-USD", 3600): 2}
        realized = store.predictions("BTC-USD", model="lasso", at=7200)
        assert [(p.predicted_close, p.realized_close) for p in realized] == [(100.5, 100.7)]


def test_each_horizon_keeps_its_own_prediction_of_the_same_close(tmp_path: Path) -> None:
    """An hourly close is a 15-minute close too: both horizons' predictions from it are kept and realized."""

    def row(g: int, model: str) -> PredictionRow:
        return PredictionRow(
            "BTC-USD", model, 7200, "v1", g, 7200 + g, 100.0, 100.5, 99.0, 101.0, 98.0, 102.0, 0.0
        )

    with Store(tmp_path / "db.sqlite3") as store:
        assert store.save_predictions([row(3600, "cnn"), row(900, "cnn"), row(900, "lasso")]) == 3
        assert [(p.granularity, p.model) for p in store.latest_predictions("BTC-USD")] == [
            (3600, "cnn"), (900, "cnn"), (900, "lasso"),
        ]  # fmt: skip
        assert [p.model for p in store.latest_predictions("BTC-USD", 900)] == ["cnn", "lasso"]
        # the quarter 7200..8100 closed; one call records both horizons' closes, each counted on its own
        assert store.realize({("BTC-USD", 900): {7200: 100.2}, ("BTC-USD", 3600): {3600: 100.1}}) == {
            ("BTC-USD", 900): 2, ("BTC-USD", 3600): 0,
        }  # fmt: skip
        assert [p.realized_close for p in store.predictions("BTC-USD", granularity=3600)] == [None]
        assert [p.realized_close for p in store.predictions("BTC-USD", granularity=900)] == [100.2, 100.2]


def test_accuracy_scores_the_realized_among_the_newest_window(tmp_path: Path) -> None:
    """Of one model and horizon, the newest ``window`` predictions; the realized among them scored
    (bounds inclusive), beside persistence on the same candles; none realized: nothing to say."""

    def row(as_of: int, predicted: float, realized: float | None, model: str = "lasso") -> PredictionRow:
        return PredictionRow("BTC-USD", model, as_of, "v1", 3600, as_of + 3600, 100.0, predicted,
                             99.0, 101.0, 98.0, 102.0, 0.0, realized)  # fmt: skip

    with Store(tmp_path / "db.sqlite3") as store:
        store.save_predictions([
            row(3600, 100.0, 150.0),  # the oldest: outside a window of three
            row(7200, 100.5, 101.0),  # on the 80 % bound: inside
            row(10800, 99.0, 97.0),  # outside both intervals
            row(14400, 100.0, None),  # the newest, its candle still open: in the window, not scored
            row(14400, 90.0, 100.0, model="cnn"),  # another model
        ])  # fmt: skip
        got = store.accuracy("BTC-USD", 3600, "lasso", 3)
        assert (got.model, got.predictions) == ("lasso", 2)
        assert got.mae == pytest.approx((0.5 + 2.0) / 2)
        assert got.persistence_mae == pytest.approx((1.0 + 3.0) / 2)
        assert got.skill == pytest.approx(1 - 1.25 / 2.0)
        assert (got.coverage_80, got.coverage_95) == (0.5, 0.5)
        assert store.accuracy("BTC-USD", 3600, "lasso", 4).predictions == 3
        assert store.accuracy("BTC-USD", 3600, "lasso", 1) == Accuracy(
            "lasso", 0, None, None, None, None, None
        )
        assert store.accuracy("BTC-USD", 900, "lasso", 10).predictions == 0


def test_predictions_of_schema_2_move_to_the_per_horizon_key(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = sqlite3.connect(path)
    for number, migration in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(migration + f"; PRAGMA user_version = {number}")
    db.execute("INSERT INTO predictions VALUES ('BTC-USD', 'cnn', 7200, 'v1', 3600, 10800, 100.0, 100.5,"
               " 99.0, 101.0, 98.0, 102.0, 0.0, 100.7)")  # fmt: skip
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        (kept,) = store.predictions("BTC-USD", granularity=3600)
        assert (kept.model, kept.as_of, kept.realized_close) == ("cnn", 7200, 100.7)
        assert store.integrity_check() == "ok"
