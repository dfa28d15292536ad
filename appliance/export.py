"""``python -m appliance export``: the store's candles and scored predictions for a time range, as CSV.

Candles go one file per product and granularity, in the bundled datasets' format, so ``import-csv``
(or training) reads them back as they were. Predictions go to one file with what came of them: the
realized close, the error, persistence's error on the same candle and whether each interval held it.
Both read the store read-only (WAL: a running appliance is never held up); predictions through
sqlite-utils, which also gives the store a command line of its own (see the README).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from appliance.candle_csv import write_candle_csv
from appliance.store import Store

#: Scored predictions, oldest first; the errors are left empty until the predicted candle has closed.
PREDICTIONS_SQL = """
SELECT product, granularity, model, model_version,
    strftime('%Y-%m-%dT%H:%M:%SZ', as_of, 'unixepoch') AS as_of,
    strftime('%Y-%m-%dT%H:%M:%SZ', target_time, 'unixepoch') AS target_time,
    last_close, predicted_close, lower_80, upper_80, lower_95, upper_95, realized_close,
    predicted_close - realized_close AS error,
    abs(predicted_close - realized_close) AS abs_error,
    abs(last_close - realized_close) AS persistence_abs_error,
    realized_close BETWEEN lower_80 AND upper_80 AS inside_80,
    realized_close BETWEEN lower_95 AND upper_95 AS inside_95
FROM predictions
WHERE product IN (SELECT value FROM json_each(:products))
    AND granularity IN (SELECT value FROM json_each(:granularities))
    AND as_of >= :start AND as_of < :end
ORDER BY product, granularity, as_of, model
"""
PREDICTION_COLUMNS = [
    "product", "granularity", "model", "model_version", "as_of", "target_time", "last_close",
    "predicted_close", "lower_80", "upper_80", "lower_95", "upper_95", "realized_close", "error",
    "abs_error", "persistence_abs_error", "inside_80", "inside_95",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Written:
    path: Path
    rows: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rows} {self.what}"


def export(
    db_path: Path,
    out: Path,
    products: Sequence[str],
    granularities: Sequence[int],
    start: int,
    end: int,
) -> list[Written]:
    """Candles starting and predictions made (``as_of``) in [start, end), written under ``out``."""
    if not db_path.exists():
        raise FileNotFoundError(f"{db_path}: no store there (set CRYPTOPI_DATA_DIR)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with Store(db_path, readonly=True) as store:
        for product in products:
            for g in granularities:
                path = out / f"candles_{product}_{g}.csv"
                rows = (r for r in store.series_rows(product, g) if start <= r.start < end)
                written.append(Written(path, write_candle_csv(path, rows), "candles"))
    path = out / "predictions.csv"
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        db = Database(connection, execute_plugins=False)
        params = {"products": json.dumps(list(products)), "granularities": json.dumps(list(granularities)),
                  "start": start, "end": end}  # fmt: skip
        count = 0
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, PREDICTION_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in db.query(PREDICTIONS_SQL, params):
                writer.writerow(row)
                count += 1
    finally:
        connection.close()
    written.append(Written(path, count, "predictions"))
    return written
