"""The appliance's one SQLite file: candles, ingest state, schema migrations.

WAL mode, so readers never block the single writer (the ingester) and the writer never blocks them.
Crash safety rests on one invariant kept by :meth:`Store.commit_trades`: the trade candles always
equal the aggregate of exactly the trades up to ``ingest_state.last_trade_id``, because the candle
deltas and that id are written in the same transaction. After a crash the ingester resumes from the
id and fetches whatever came later over REST.

Durability is chosen for an SD card, not for the last commit: ``synchronous = NORMAL`` in WAL mode
fsyncs only at checkpoints, so a power cut may lose the newest commits but never corrupts the file,
and whatever it loses is fetched again over REST. A store is opened only if this release knows its
schema: a newer one is refused before anything is written to it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Literal

from appliance.candles import (
    SIZE_SCALE,
    TRADE_GRANULARITIES,
    Candle,
    CandleRow,
    IngestState,
    bucket_start,
    splice,
)
from appliance.predictions import Accuracy, Calibration, PredictionRow

log = logging.getLogger(__name__)

#: One product's trade candles of a bounded span, a lookup per bucket: the table is keyed time first
#: (so that a commit of every product's newest candles touches adjacent pages of the SD card), and a
#: range read of one product would step over every other product's candles of the same buckets,
#: fifty times the rows with fifty products. Parameters: product, granularity, first bucket, end.
_BUCKET_BY_BUCKET = """
    WITH RECURSIVE bucket(start) AS (
        SELECT ?3 WHERE ?3 < ?4 UNION ALL SELECT start + ?2 FROM bucket WHERE start + ?2 < ?4
    )
    SELECT t.start, open, high, low, close, volume_e8, trades FROM bucket JOIN trade_candles AS t
    ON t.granularity = ?2 AND t.start = bucket.start AND t.product = ?1 ORDER BY t.start
"""
_PREDICTION_FIELDS = tuple(f.name for f in fields(PredictionRow))
#: A prediction's column values in table order (dataclasses.astuple deep-copies every field).
_prediction_values = attrgetter(*_PREDICTION_FIELDS)

MIGRATIONS: tuple[str, ...] = (
    # 1: trade-built candles, imported history, per-product ingest cursor.
    """
    CREATE TABLE trade_candles (
        product TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        start INTEGER NOT NULL,
        open REAL NOT NULL, high REAL NOT NULL, low REAL NOT NULL, close REAL NOT NULL,
        volume_e8 INTEGER NOT NULL CHECK (volume_e8 > 0),
        trades INTEGER NOT NULL CHECK (trades > 0),
        PRIMARY KEY (product, granularity, start)
    ) WITHOUT ROWID;
    CREATE TABLE history_candles (
        product TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        start INTEGER NOT NULL,
        open REAL NOT NULL, high REAL NOT NULL, low REAL NOT NULL, close REAL NOT NULL,
        volume REAL NOT NULL CHECK (volume >= 0),
        source TEXT NOT NULL,
        PRIMARY KEY (product, granularity, start)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_state (
        product TEXT PRIMARY KEY,
        first_trade_id INTEGER NOT NULL,
        last_trade_id INTEGER NOT NULL,
        last_trade_time_us INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2: when ingest coverage began (which trade-built candles are complete), and every prediction.
    """
    ALTER TABLE ingest_state ADD COLUMN first_trade_time_us INTEGER;
    CREATE TABLE predictions (
        product TEXT NOT NULL,
        model TEXT NOT NULL,
        as_of INTEGER NOT NULL,
        model_version TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        target_time INTEGER NOT NULL,
        last_close REAL NOT NULL,
        predicted_close REAL NOT NULL,
        lower_80 REAL NOT NULL, upper_80 REAL NOT NULL,
        lower_95 REAL NOT NULL, upper_95 REAL NOT NULL,
        created_at REAL NOT NULL,
        realized_close REAL,
        PRIMARY KEY (product, model, as_of)
    ) WITHOUT ROWID;
    CREATE INDEX predictions_unrealized ON predictions (product, target_time) WHERE realized_close IS NULL;
    """,
    # 3: a prediction per horizon too: an hourly close is also a 15-minute close, so the key needs the
    # granularity (before it, the second horizon's prediction of the same close was dropped).
    """
    CREATE TABLE predictions_by_horizon (
        product TEXT NOT NULL,
        model TEXT NOT NULL,
        as_of INTEGER NOT NULL,
        model_version TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        target_time INTEGER NOT NULL,
        last_close REAL NOT NULL,
        predicted_close REAL NOT NULL,
        lower_80 REAL NOT NULL, upper_80 REAL NOT NULL,
        lower_95 REAL NOT NULL, upper_95 REAL NOT NULL,
        created_at REAL NOT NULL,
        realized_close REAL,
        PRIMARY KEY (product, granularity, model, as_of)
    ) WITHOUT ROWID;
    INSERT INTO predictions_by_horizon SELECT * FROM predictions;
    DROP TABLE predictions;
    ALTER TABLE predictions_by_horizon RENAME TO predictions;
    CREATE INDEX predictions_unrealized ON predictions (product, granularity, target_time)
        WHERE realized_close IS NULL;
    """,
    # 4: trade candles keyed time first, so one commit of every product's newest minute, quarter and hour
    # touches a few adjacent pages rather than three per product (what an SD card writes). And the
    # 15-minute trade candles rebuilt from the minute candles kept (exact, like them): a store of
    # schema 2 had none, and one upgraded to 3 began them part-way through a quarter.
    """
    CREATE TABLE trade_candles_v4 (
        product TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        start INTEGER NOT NULL,
        open REAL NOT NULL, high REAL NOT NULL, low REAL NOT NULL, close REAL NOT NULL,
        volume_e8 INTEGER NOT NULL CHECK (volume_e8 > 0),
        trades INTEGER NOT NULL CHECK (trades > 0),
        PRIMARY KEY (granularity, start, product)
    ) WITHOUT ROWID;
    INSERT INTO trade_candles_v4 SELECT * FROM trade_candles;
    INSERT OR REPLACE INTO trade_candles_v4
    SELECT product, 900, quarter, open, high, low, close, volume_e8, trades FROM (
        SELECT product, start - start % 900 AS quarter,
            first_value(open) OVER q AS open, max(high) OVER q AS high, min(low) OVER q AS low,
            last_value(close) OVER q AS close, sum(volume_e8) OVER q AS volume_e8,
            sum(trades) OVER q AS trades, row_number() OVER q AS n
        FROM trade_candles WHERE granularity = 60
        WINDOW q AS (PARTITION BY product, start - start % 900 ORDER BY start
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ) AS m WHERE n = 1 AND quarter >= (  -- from ingest's first quarter, or the first whole one kept
        SELECT CASE WHEN min(t.start) <= s.first_trade_time_us / 1000000
                    THEN min(t.start) - min(t.start) % 900 ELSE (min(t.start) + 899) / 900 * 900 END
        FROM trade_candles AS t JOIN ingest_state AS s USING (product)
        WHERE t.granularity = 60 AND t.product = m.product
    );
    DROP TABLE trade_candles;
    ALTER TABLE trade_candles_v4 RENAME TO trade_candles;
    """,
    # 5 (issue #12): how each prediction's intervals were calibrated (its version's own quantiles, a
    # pooled set's, or this device's from the product's history), and the device's calibrations, so a
    # restart reuses them.
    """
    ALTER TABLE predictions ADD COLUMN calibration TEXT NOT NULL DEFAULT 'training';
    ALTER TABLE predictions ADD COLUMN calibrated_at REAL;
    ALTER TABLE predictions ADD COLUMN calibration_note TEXT;
    CREATE TABLE calibrations (
        product TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        version TEXT NOT NULL,
        method TEXT NOT NULL CHECK (method IN ('device', 'pooled')),
        calibrated_at REAL NOT NULL,
        through INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        first_start INTEGER,
        last_start INTEGER,
        quantiles TEXT,
        reason TEXT,
        PRIMARY KEY (product, granularity)
    ) WITHOUT ROWID;
    """,
)

CandleSource = Literal["trades", "history"]


@dataclass(frozen=True, slots=True)
class UpsertResult:
    inserted: int
    changed: int
    unchanged: int


@dataclass(frozen=True, slots=True)
class TradeCommit:
    """One product's share of a commit: candle deltas (keyed by granularity, start) and its cursor."""

    product: str
    deltas: Mapping[tuple[int, int], Candle]
    first_trade_id: int
    last_trade_id: int
    last_trade_time_us: int
    first_trade_time_us: int | None = None


class StoreRefused(Exception):
    """The file belongs to a newer release: it is left exactly as it is."""


class StoreClosed(sqlite3.OperationalError):
    """The store is not open (it could not be, or is being replaced): like any other storage error."""


class Store:
    """One connection to the database; make one per thread or task that needs its own.

    ``connect=False`` makes it closed until :meth:`connect` succeeds: every call raises
    :class:`StoreClosed` (a ``sqlite3.Error``) meanwhile, so callers handle it like any storage error.
    """

    def __init__(self, path: Path | str, *, readonly: bool = False, connect: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        if connect:
            self.connect()

    def connect(self) -> None:
        """(Re)open the file; a writer migrates it. Raises sqlite3.Error or StoreRefused."""
        self.close()
        if self.readonly:
            self._conn = self._open_readonly()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.refuse_if_newer()
            self._conn = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA busy_timeout = 5000")
                db.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode: fsync at checkpoints only. A power cut may lose the newest
                # commits, never the file; the ingester re-fetches anything after the committed id.
                db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
            except BaseException:
                self.close()
                raise

    def _open_readonly(self) -> sqlite3.Connection:
        """A read-only connection; ``immutable`` when the folder cannot even take SQLite's -shm file."""
        uri = f"file:{self.path}?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA user_version").fetchone()
        except sqlite3.OperationalError as exc:
            db.close()
            if exc.sqlite_errorcode != sqlite3.SQLITE_CANTOPEN or not self.path.exists():
                raise
            db = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None,
                                 check_same_thread=False)  # fmt: skip
        return db

    def refuse_if_newer(self) -> None:
        """StoreRefused if the file's schema is newer than this release's; read without writing."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        db = self._open_readonly()
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
        finally:
            db.close()
        self._check_version(version)

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise StoreRefused(
                f"{self.path.name} was written by a newer release (schema {version}; this release "
                f"knows up to {len(MIGRATIONS)}): left untouched"
            )

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed(f"{self.path.name} is not open")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite has already rolled back after some errors (disk full)
                db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        self._check_version(version)
        if version == len(MIGRATIONS):  # one page written: fail now, not at the first commit, if it cannot
            with self._transaction() as db:
                db.execute(f"PRAGMA user_version = {version}")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            with self._transaction() as db:
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
            log.info("schema migrated", extra={"db": str(self.path), "version": number})

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database file and empty it; False if a reader held it up."""
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    # -- trade path -------------------------------------------------------------------------------

    def commit_trades(self, commits: Iterable[TradeCommit]) -> None:
        """Merge every product's candle deltas and advance their cursors, in one transaction."""
        with self._transaction() as db:
            for c in commits:
                db.executemany(
                    """
                    INSERT INTO trade_candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (granularity, start, product) DO UPDATE SET
                        high = max(high, excluded.high), low = min(low, excluded.low),
                        close = excluded.close, volume_e8 = volume_e8 + excluded.volume_e8,
                        trades = trades + excluded.trades
                    """,
                    [
                        (c.product, g, s, d.open, d.high, d.low, d.close, d.volume_e8, d.trades)
                        for (g, s), d in c.deltas.items()
                    ],
                )
                db.execute(
                    """
                    INSERT INTO ingest_state VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (product) DO UPDATE SET last_trade_id = excluded.last_trade_id,
                        last_trade_time_us = excluded.last_trade_time_us, updated_at = excluded.updated_at
                    """,
                    (c.product, c.first_trade_id, c.last_trade_id, c.last_trade_time_us, time.time(),
                     c.first_trade_time_us),
                )  # fmt: skip

    def ingest_state(self, product: str) -> IngestState | None:
        row = self._db.execute(
            "SELECT product, first_trade_id, last_trade_id, last_trade_time_us, first_trade_time_us"
            " FROM ingest_state"
            " WHERE product = ?",
            (product,),
        ).fetchone()
        return IngestState(*row) if row else None

    def open_candles(self, product: str) -> dict[int, tuple[int, Candle]]:
        """The stored part of the newest bucket of each trade granularity: {granularity: (start, candle)}."""
        state = self.ingest_state(product)
        if state is None:
            return {}
        out = {}
        for g in TRADE_GRANULARITIES:
            start = bucket_start(state.last_trade_time_us, g)
            row = self._db.execute(
                "SELECT open, high, low, close, volume_e8, trades FROM trade_candles"
                " WHERE granularity = ? AND start = ? AND product = ?",
                (g, start, product),
            ).fetchone()
            if row:
                out[g] = (start, Candle(*row))
        return out

    def last_trade_times(self) -> dict[str, int]:
        """Every product's newest committed trade time (us): the market clock, in one read."""
        return dict(self._db.execute("SELECT product, last_trade_time_us FROM ingest_state"))

    def prune_trade_candles(self, granularity: int, keep_s: float) -> int:
        """Drop candles of one granularity older than ``keep_s`` before each product's newest one.

        Measured from the data rather than the wall clock, so replaying old markets prunes sanely.
        """
        removed = 0
        with self._transaction() as db:
            for (product,) in db.execute("SELECT product FROM ingest_state").fetchall():
                newest = db.execute(  # from the end of the time-ordered key: a few rows read
                    "SELECT start FROM trade_candles WHERE granularity = ? AND product = ?"
                    " ORDER BY start DESC LIMIT 1",
                    (granularity, product),
                ).fetchone()
                if newest is not None:
                    cur = db.execute(
                        "DELETE FROM trade_candles WHERE granularity = ? AND start < ? AND product = ?",
                        (granularity, newest[0] - keep_s, product),
                    )
                    removed += cur.rowcount
        return removed

    # -- imported history -------------------------------------------------------------------------

    def upsert_history(
        self, product: str, granularity: int, rows: Iterable[CandleRow], source: str
    ) -> UpsertResult:
        """Insert or correct imported candles; identical rows are left untouched (idempotent)."""
        rows = list(rows)
        if not rows:
            return UpsertResult(0, 0, 0)
        existing = {
            start
            for (start,) in self._db.execute(
                "SELECT start FROM history_candles WHERE product = ? AND granularity = ?"
                " AND start BETWEEN ? AND ?",
                (product, granularity, min(r.start for r in rows), max(r.start for r in rows)),
            )
        }
        inserted = changed = 0
        with self._transaction() as db:
            for r in rows:
                cur = db.execute(
                    """
                    INSERT INTO history_candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (product, granularity, start) DO UPDATE SET
                        open = excluded.open, high = excluded.high, low = excluded.low,
                        close = excluded.close, volume = excluded.volume, source = excluded.source
                    WHERE open <> excluded.open OR high <> excluded.high OR low <> excluded.low
                        OR close <> excluded.close OR volume <> excluded.volume
                    """,
                    (product, granularity, r.start, r.open, r.high, r.low, r.close, r.volume, source),
                )
                if cur.rowcount:
                    if r.start in existing:
                        changed += 1
                    else:
                        inserted += 1
        return UpsertResult(inserted, changed, len(rows) - inserted - changed)

    # -- reads ------------------------------------------------------------------------------------

    def candles(
        self,
        product: str,
        granularity: int,
        *,
        source: CandleSource = "trades",
        start: int | None = None,
        end: int | None = None,
    ) -> list[CandleRow]:
        """Candles with ``start <= bucket start < end``, oldest first."""
        lo = start if start is not None else -(2**62)
        hi = end if end is not None else 2**62
        if source == "trades":
            if start is None or end is None:
                sql = (
                    "SELECT start, open, high, low, close, volume_e8, trades FROM trade_candles"
                    " WHERE product = ? AND granularity = ? AND start >= ? AND start < ? ORDER BY start"
                )
            else:  # one lookup a bucket (see _BUCKET_BY_BUCKET)
                sql, lo = _BUCKET_BY_BUCKET, -(-start // granularity) * granularity
            return [
                CandleRow(s, o, h, lo_, c, v / SIZE_SCALE, n)
                for s, o, h, lo_, c, v, n in self._db.execute(sql, (product, granularity, lo, hi))
            ]
        sql = (
            "SELECT start, open, high, low, close, volume FROM history_candles"
            " WHERE product = ? AND granularity = ? AND start >= ? AND start < ? ORDER BY start"
        )
        return [CandleRow(*row) for row in self._db.execute(sql, (product, granularity, lo, hi))]

    def series_rows(self, product: str, granularity: int, *, last: int | None = None) -> list[CandleRow]:
        """The best closed candles of a product, oldest first (only the newest ``last`` if given).

        What "best" means is :func:`appliance.candles.splice`; this only reads what it needs.
        """
        state = self.ingest_state(product)
        newest = self._db.execute(
            "SELECT max(start) FROM history_candles WHERE product = ? AND granularity = ?",
            (product, granularity),
        ).fetchone()[0]
        if state is not None:
            newest = max(newest or 0, bucket_start(state.last_trade_time_us, granularity))
        if newest is None:
            return []
        since = newest - (last + 1) * granularity if last is not None else None
        history = self.candles(product, granularity, source="history", start=since)
        until = newest + granularity if since is not None else None  # no trade candle is newer
        built = self.candles(product, granularity, source="trades", start=since, end=until) if state else []
        rows = splice(history, built, state, granularity)
        return rows[-last:] if last else rows

    # -- predictions ------------------------------------------------------------------------------

    def save_predictions(self, rows: Iterable[PredictionRow]) -> int:
        """Store new predictions; one already made for the same product, model and candle is kept."""
        with self._transaction() as db:
            cur = db.executemany(
                f"INSERT OR IGNORE INTO predictions VALUES ({', '.join('?' * len(_PREDICTION_FIELDS))})",
                map(_prediction_values, rows),
            )
        return cur.rowcount

    # -- calibrations -----------------------------------------------------------------------------

    def save_calibration(self, c: Calibration) -> None:
        """The newest calibration of a product at a horizon (it replaces the one before)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c.product, c.granularity, c.version, c.method, c.calibrated_at, c.through, c.rows, c.first,
                 c.last, json.dumps(c.quantiles) if c.quantiles is not None else None, c.reason),
            )  # fmt: skip

    def calibrations(self) -> list[Calibration]:
        rows = self._db.execute(
            "SELECT product, granularity, version, method, calibrated_at, through, rows, first_start,"
            " last_start, quantiles, reason FROM calibrations ORDER BY product, granularity"
        )
        return [Calibration(p, g, v, m, at, through, n, first, last, json.loads(q) if q else None, reason)
                for p, g, v, m, at, through, n, first, last, q, reason in rows]  # fmt: skip

    def predictions(
        self,
        product: str,
        *,
        model: str | None = None,
        since: int | None = None,
        at: int | None = None,
        limit: int | None = None,
        granularity: int | None = None,
    ) -> list[PredictionRow]:
        """Predictions newest first, of one model and horizon or all, with ``since <= as_of <= at``."""
        sql = "SELECT * FROM predictions WHERE product = ? AND as_of >= ? AND as_of <= ?"
        args: list[object] = [product, since if since is not None else 0, at if at is not None else 2**62]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if granularity is not None:
            sql += " AND granularity = ?"
            args.append(granularity)
        sql += " ORDER BY as_of DESC, model"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [PredictionRow(*row) for row in self._db.execute(sql, args)]

    def latest_predictions(self, product: str, granularity: int | None = None) -> list[PredictionRow]:
        """The newest prediction of every model of a product (at one horizon, or at each)."""
        where = "product = ?" + (" AND granularity = ?" if granularity is not None else "")
        args = (product, granularity) if granularity is not None else (product,)
        rows = self._db.execute(
            f"""
            SELECT p.* FROM predictions AS p JOIN (
                SELECT granularity, model, max(as_of) AS as_of FROM predictions WHERE {where}
                GROUP BY granularity, model
            ) AS newest USING (granularity, model, as_of)
            WHERE p.product = ? ORDER BY p.granularity DESC, p.model
            """,
            (*args, product),
        )
        return [PredictionRow(*row) for row in rows]

    def realize(self, closes: Mapping[tuple[str, int], Mapping[int, float]]) -> dict[tuple[str, int], int]:
        """Record the realized close of predicted candles that have closed (keyed by product and
        granularity, then candle start), all in one transaction; how many each key realized."""
        done = {}
        with self._transaction() as db:
            for (product, granularity), by_start in closes.items():
                done[product, granularity] = db.executemany(
                    "UPDATE predictions SET realized_close = ? WHERE product = ? AND granularity = ?"
                    " AND target_time = ? AND realized_close IS NULL",
                    [(close, product, granularity, start + granularity) for start, close in by_start.items()],
                ).rowcount
        return done

    def accuracy(self, product: str, granularity: int, model: str, window: int) -> Accuracy:
        """How one model's realized predictions among its newest ``window`` at one horizon scored (the
        others are still waiting for their candle), beside persistence on the same candles. Summed
        by SQLite: every close scores every model of every product, a week of predictions each."""
        n, mae, base, in_80, in_95 = self._db.execute(
            "SELECT count(*), avg(abs(predicted_close - realized_close)),"
            " avg(abs(last_close - realized_close)), avg(realized_close BETWEEN lower_80 AND upper_80),"
            " avg(realized_close BETWEEN lower_95 AND upper_95) FROM (SELECT last_close, predicted_close,"
            " lower_80, upper_80, lower_95, upper_95, realized_close FROM predictions"
            " WHERE product = ? AND granularity = ? AND model = ?"
            " ORDER BY as_of DESC LIMIT ?) WHERE realized_close IS NOT NULL",
            (product, granularity, model, window),
        ).fetchone()
        return Accuracy(model, n, mae, base, 1 - mae / base if base else None, in_80, in_95)

    def trade_candle_deltas(self, product: str, granularity: int) -> dict[int, Candle]:
        """Exact stored trade candles (integer volume), for comparisons against an oracle."""
        return {
            s: Candle(o, h, lo, c, v, n)
            for s, o, h, lo, c, v, n in self._db.execute(
                "SELECT start, open, high, low, close, volume_e8, trades FROM trade_candles"
                " WHERE product = ? AND granularity = ?",
                (product, granularity),
            )
        }

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def quick_check(self) -> str:
        """'ok', or SQLite's first complaint: reads every page (seconds for a large file on a Pi)."""
        return str(self._db.execute("PRAGMA quick_check").fetchone()[0])
