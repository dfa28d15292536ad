"""Trades and OHLCV candles as exact values, and the one aggregation every path uses.

Trade times are integer microseconds and sizes integer units of 1e-8 (Coinbase quotes at most eight
decimals), so volumes add up exactly and a candle built from a trade stream never depends on the
order of float additions. The store, the replay server and the tests' oracle all aggregate through
:func:`aggregate` / :meth:`Candle.merge`, so they cannot disagree about what a candle is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, NamedTuple

US = 1_000_000
SIZE_SCALE = 100_000_000
SIZE_DECIMALS = 8
MINUTE, HOUR = 60, 3600
#: The horizons the appliance predicts: the next hour's close and the next 15 minutes'.
HORIZONS = (HOUR, 900)
#: Granularities the trade path maintains itself: minute candles, and those of every horizon.
TRADE_GRANULARITIES = (MINUTE, 900, HOUR)
#: Granularities Coinbase's REST candles endpoint accepts.
COINBASE_GRANULARITIES = (60, 300, 900, 3600, 21600, 86400)

#: A Coinbase product id, ``BASE-QUOTE`` (BTC-USD, ETH-EUR).
PRODUCT_PATTERN = r"^[A-Z0-9]{1,12}-[A-Z0-9]{1,12}$"
Side = Literal["buy", "sell"]


def quote_currency(product: str) -> str:
    """The currency a product is priced in: Coinbase ids are BASE-QUOTE (BTC-EUR -> EUR)."""
    return product.rsplit("-", 1)[-1]


_SIZE = re.compile(r"^(\d{1,12})(?:\.(\d{1,8}))?$")
_PRICE = re.compile(r"^\d{1,12}(?:\.\d{1,12})?$")


@dataclass(frozen=True, slots=True)
class Trade:
    product: str
    trade_id: int
    price: float
    size_e8: int
    time_us: int
    side: Side

    @property
    def size(self) -> str:
        return format_size(self.size_e8)


@dataclass(slots=True)
class Candle:
    """One bucket's OHLCV. ``merge`` appends a later stretch of trades to it."""

    open: float
    high: float
    low: float
    close: float
    volume_e8: int
    trades: int

    @classmethod
    def of(cls, trade: Trade) -> Candle:
        p = trade.price
        return cls(p, p, p, p, trade.size_e8, 1)

    def add(self, trade: Trade) -> None:
        p = trade.price
        if p > self.high:
            self.high = p
        elif p < self.low:
            self.low = p
        self.close = p
        self.volume_e8 += trade.size_e8
        self.trades += 1

    def merge(self, later: Candle) -> None:
        """Extend with a candle made of trades that all come after this one's (by trade_id)."""
        self.high = max(self.high, later.high)
        self.low = min(self.low, later.low)
        self.close = later.close
        self.volume_e8 += later.volume_e8
        self.trades += later.trades

    @property
    def volume(self) -> float:
        return self.volume_e8 / SIZE_SCALE


class CandleRow(NamedTuple):
    """A closed candle as stored and served: open time (epoch seconds), OHLC and volume in base units.

    A named tuple, not a frozen dataclass: every close reads a window of them for each product and
    horizon, and a tuple is built three times faster.
    """

    start: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int | None = None


@dataclass(frozen=True, slots=True)
class IngestState:
    """How far a product's trade-built candles reach: the trade ids and times ingest has covered."""

    product: str
    first_trade_id: int
    last_trade_id: int
    last_trade_time_us: int
    first_trade_time_us: int | None = None  # None: ingested before coverage was recorded


def check_ohlcv(open_: float | Decimal, high: float | Decimal, low: float | Decimal,
                close: float | Decimal, volume: float | Decimal) -> None:  # fmt: skip
    """ValueError unless the values make a candle: finite, positive prices inside the range, volume >= 0.

    One rule for every source (REST rows, CSV files), so no path accepts what another refuses.
    """
    if not all(math.isfinite(v) for v in (open_, high, low, close, volume)):
        raise ValueError("non-finite value")
    if not (0 < low <= min(open_, close) and max(open_, close) <= high) or volume < 0:
        raise ValueError("inconsistent OHLCV")


def splice(
    history: Sequence[CandleRow],
    built: Sequence[CandleRow],
    state: IngestState | None,
    granularity: int,
) -> list[CandleRow]:
    """The best closed candles of a product, oldest first: imported history, then trade-built candles.

    Trade-built candles are exact but complete only from the first bucket ingest covered whole; the
    bucket of the newest trade may still be open, so it is left out. Before the first trade-built
    candle used, history stands in.
    """
    if state is None:
        return list(history)
    if state.first_trade_time_us is not None:  # the first bucket ingest saw from its start
        covered_from = -(-state.first_trade_time_us // (granularity * US)) * granularity
    else:  # ingested before coverage was recorded: trust trade candles only after the history
        covered_from = history[-1].start + granularity if history else 2**62
    open_bucket = bucket_start(state.last_trade_time_us, granularity)
    whole = [r for r in built if covered_from <= r.start != open_bucket]
    cut = whole[0].start if whole else open_bucket
    return [r for r in history if r.start < cut] + whole


def bucket_start(time_us: int, granularity: int) -> int:
    """Epoch seconds of the start of the bucket holding ``time_us``."""
    return time_us // (granularity * US) * granularity


def aggregate(trades: Iterable[Trade], granularity: int) -> dict[tuple[str, int], Candle]:
    """Candles keyed by (product, bucket start) from trades given in trade_id order per product."""
    out: dict[tuple[str, int], Candle] = {}
    for t in trades:
        key = (t.product, bucket_start(t.time_us, granularity))
        c = out.get(key)
        if c is None:
            out[key] = Candle.of(t)
        else:
            c.add(t)
    return out


def parse_size_e8(text: str) -> int:
    """Exact integer 1e-8 units of a positive decimal string; ValueError on anything else."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a plain decimal with at most {SIZE_DECIMALS} decimals: {text[:40]!r}")
    whole, frac = m.group(1), m.group(2) or ""
    value = int(whole) * SIZE_SCALE + int(frac.ljust(SIZE_DECIMALS, "0"))
    if value <= 0:
        raise ValueError("size must be positive")
    return value


def parse_price(text: str) -> float:
    """A positive plain decimal string as a float (the float every path compares)."""
    if _PRICE.match(text) is None:
        raise ValueError(f"not a plain decimal: {text[:40]!r}")
    value = float(text)
    if not value > 0:
        raise ValueError("price must be positive")
    return value


def format_price(price: float) -> str:
    """Plain decimal text that parses back to the same float (never ``1e-05``)."""
    return format(Decimal(repr(price)), "f")


def format_size(size_e8: int) -> str:
    whole, frac = divmod(size_e8, SIZE_SCALE)
    return f"{whole}.{frac:08d}"


def format_time(time_us: int) -> str:
    """Coinbase's wire format: ISO-8601 UTC with microseconds and a Z."""
    secs, us = divmod(time_us, US)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{us:06d}Z"


def parse_time(text: str) -> int:
    """Epoch seconds from epoch digits or ISO-8601 (a date, or date and time; UTC unless zoned)."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not an ISO-8601 time or epoch seconds") from None
    return to_time_us(dt if dt.tzinfo else dt.replace(tzinfo=UTC)) // US


def to_time_us(dt: datetime) -> int:
    """Exact epoch microseconds of an aware datetime (no float round trip)."""
    if dt.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds
