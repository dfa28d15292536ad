"""History into the store: Coinbase REST candles (``backfill``) and candle CSV files (``import-csv``).

Both are idempotent: a candle already stored with the same values is left alone, so running either
twice changes nothing; a corrected candle is updated and counted as changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from appliance.coinbase.rest import MAX_CANDLES_PER_REQUEST, CoinbaseRest, validate_granularity
from appliance.coinbase.tape import read_candle_csv
from appliance.store import Store, UpsertResult

log = logging.getLogger(__name__)
CSV_CHUNK = 5000


@dataclass(slots=True)
class LoadResult:
    requests: int = 0
    rows: int = 0
    inserted: int = 0
    changed: int = 0
    unchanged: int = 0

    def add(self, r: UpsertResult) -> None:
        self.rows += r.inserted + r.changed + r.unchanged
        self.inserted += r.inserted
        self.changed += r.changed
        self.unchanged += r.unchanged


async def backfill(
    store: Store,
    rest: CoinbaseRest,
    product: str,
    granularity: int,
    start: int,
    end: int,
    *,
    now: float | None = None,
    progress: bool = True,
) -> LoadResult:
    """Candles with bucket start in [start, end), but never the bucket still open at ``now``."""
    validate_granularity(granularity)
    start -= start % granularity
    current_bucket = int(now if now is not None else time.time()) // granularity * granularity
    end = min(end, current_bucket)
    if end <= start:
        raise ValueError("nothing to back-fill: the range is empty or still in progress")
    step = MAX_CANDLES_PER_REQUEST * granularity
    windows = range(start, end, step)
    result = LoadResult()
    bar = tqdm(windows, desc=f"backfill {product} {granularity}s", unit="req", disable=not progress)
    for w in bar:
        rows = await rest.candles(product, granularity, w, min(w + step, end))
        result.requests += 1
        result.add(store.upsert_history(product, granularity, rows, "coinbase"))
        bar.set_postfix(rows=result.rows, new=result.inserted)
    log.info("backfill done", extra={"product": product, "granularity": granularity, **asdict(result)})
    return result


def import_csv(
    store: Store, path: Path, product: str, granularity: int, *, progress: bool = True
) -> LoadResult:
    validate_granularity(granularity)
    result = LoadResult()
    chunk = []
    with tqdm(desc=f"import {path.name}", unit="row", disable=not progress) as bar:
        for candle in read_candle_csv(path, granularity):
            chunk.append(candle.row())
            if len(chunk) == CSV_CHUNK:
                result.add(store.upsert_history(product, granularity, chunk, f"csv:{path.name}"))
                bar.update(len(chunk))
                chunk = []
        if chunk:
            result.add(store.upsert_history(product, granularity, chunk, f"csv:{path.name}"))
            bar.update(len(chunk))
    log.info("csv imported", extra={"file": str(path), "product": product, **asdict(result)})
    return result
