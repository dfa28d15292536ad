"""Candle CSV files (``time,open,high,low,close,volume``, ISO UTC open times): read and checked, written.

The bundled datasets, ``import-csv``, training and the replay's candle tapes all read through here,
with the OHLCV rule REST rows are held to (:func:`appliance.candles.check_ohlcv`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

from appliance.candles import COINBASE_GRANULARITIES, CandleRow, check_ohlcv, format_price, parse_time

HEADER = ["time", "open", "high", "low", "close", "volume"]


@dataclass(frozen=True, slots=True)
class CsvCandle:
    """A candle as written in the CSV files: prices kept as their exact decimal text."""

    start: int
    open: str
    high: str
    low: str
    close: str
    volume: str

    def row(self) -> CandleRow:
        return CandleRow(
            self.start,
            float(self.open),
            float(self.high),
            float(self.low),
            float(self.close),
            float(self.volume),
        )


class CandleCsvError(ValueError):
    """A file that is not a candle CSV; the message names the file and line."""


def read_candle_csv(path: Path, granularity: int | None = None) -> Iterator[CsvCandle]:
    """Rows of a ``time,open,high,low,close,volume`` file (ISO UTC open time), checked as read."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != HEADER:
            raise CandleCsvError(f"{path}: header must be {','.join(HEADER)}, got {reader.fieldnames}")
        previous = None
        for line, rec in enumerate(reader, start=2):
            try:
                start = parse_time(rec["time"])
                check_ohlcv(*(Decimal(rec[k]) for k in HEADER[1:]))
            except (ValueError, ArithmeticError, TypeError) as exc:
                raise CandleCsvError(f"{path}:{line}: {exc}") from None
            if granularity and start % granularity:
                raise CandleCsvError(f"{path}:{line}: {rec['time']} is not on a {granularity}s boundary")
            if previous is not None and start <= previous:
                raise CandleCsvError(f"{path}:{line}: rows must be in ascending time order")
            previous = start
            yield CsvCandle(start, rec["open"], rec["high"], rec["low"], rec["close"], rec["volume"])


def write_candle_csv(path: Path, rows: Iterable[CandleRow]) -> int:
    """Write candles in the format :func:`read_candle_csv` reads, each value exact; returns the count."""
    count = 0
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        for r in rows:
            when = datetime.fromtimestamp(r.start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            writer.writerow([when, *(format_price(v) for v in (r.open, r.high, r.low, r.close, r.volume))])
            count += 1
    return count


def infer_granularity(starts: Sequence[int]) -> int:
    """The spacing of a candle file: the smallest step between rows (gaps only widen steps)."""
    steps = {b - a for a, b in pairwise(starts)}
    g = min(steps, default=0)
    if g not in COINBASE_GRANULARITIES:
        raise CandleCsvError(f"rows are {g}s apart; expected one of {COINBASE_GRANULARITIES}")
    return g
