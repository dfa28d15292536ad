"""Trade tapes for the replay server: real captured trades, or trades that rebuild real candles.

A candle tape turns each real OHLCV candle into a handful of trades whose aggregate is that candle
exactly (open first, close last, the high and the low touched, sizes summing to the volume to the
last 1e-8), so hours or days of a real market can be replayed through the real protocol.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import pairwise
from pathlib import Path

from appliance.candle_csv import CandleCsvError, CsvCandle, infer_granularity, read_candle_csv
from appliance.candles import US, Side, Trade, format_price, format_time, parse_size_e8
from appliance.coinbase.messages import MatchMessage, parse_feed_frame


def trades_from_candles(
    candles: Iterable[CsvCandle],
    product: str,
    granularity: int,
    *,
    first_trade_id: int = 1_000_000,
    trades_per_candle: tuple[int, int] = (4, 10),
    seed: int = 0,
) -> list[Trade]:
    """Trades that aggregate to each candle exactly. Candles too thin to carry their path are refused."""
    rng = random.Random(f"{seed}:{product}")
    trades: list[Trade] = []
    next_id = first_trade_id
    for candle in candles:
        o, h, lo, c = (Decimal(x) for x in (candle.open, candle.high, candle.low, candle.close))
        # A plausible path: up-candles dip first, down-candles rally first.
        path = [o, lo, h, c] if c >= o else [o, h, lo, c]
        target = rng.randint(*trades_per_candle)
        while len(path) < target:
            i = rng.randrange(len(path) - 1)
            a, b = path[i], path[i + 1]
            # Round the midpoint to the finer tick of its neighbours: it stays between them.
            tick = min(_exponent(a), _exponent(b), -2)
            path.insert(i + 1, ((a + b) / 2).quantize(Decimal(1).scaleb(tick), ROUND_HALF_EVEN))
        volume_e8 = parse_size_e8(_plain(candle.volume))
        if volume_e8 < len(path):
            raise ValueError(
                f"{product} candle at {candle.start} has too little volume for {len(path)} trades"
            )
        sizes = _split(volume_e8, len(path), rng)
        span_us = granularity * US
        for k, (price, size) in enumerate(zip(path, sizes, strict=True)):
            time_us = candle.start * US + (k + 1) * span_us // (len(path) + 1)
            side: Side = "buy" if rng.random() < 0.5 else "sell"
            trades.append(Trade(product, next_id, float(price), size, time_us, side))
            next_id += 1
    return trades


def _exponent(d: Decimal) -> int:
    exp = d.as_tuple().exponent
    assert isinstance(exp, int), "finite by construction"
    return exp


def _plain(decimal_text: str) -> str:
    """``1e-05`` and friends as plain decimal text."""
    return format(Decimal(decimal_text), "f")


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive integers summing to ``total``, at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in pairwise(bounds)]


def trades_from_capture(path: Path) -> list[Trade]:
    """The match / last_match trades of a raw WebSocket capture (one JSON frame a line)."""
    seen: dict[tuple[str, int], Trade] = {}
    with path.open() as fh:
        for line in fh:
            msg = parse_feed_frame(line)
            if isinstance(msg, MatchMessage):
                t = msg.trade()
                seen[(t.product, t.trade_id)] = t
    return sorted(seen.values(), key=lambda t: (t.product, t.trade_id))


def match_frame(t: Trade, kind: str, sequence: int = 0) -> dict[str, object]:
    """A trade as Coinbase's ``match`` / ``last_match`` message."""
    return {
        "type": kind,
        "trade_id": t.trade_id,
        "maker_order_id": "",
        "taker_order_id": "",
        "side": t.side,
        "size": t.size,
        "price": format_price(t.price),
        "product_id": t.product,
        "sequence": sequence,
        "time": format_time(t.time_us),
    }


def load_tape(
    *,
    captures: Sequence[Path] = (),
    candles: Sequence[tuple[str, Path]] = (),
    start: int | None = None,
    end: int | None = None,
    trades_per_candle: tuple[int, int] = (4, 10),
    seed: int = 0,
) -> list[Trade]:
    """One tape from captures and candle files, limited to trade times in [start, end) epoch seconds."""
    trades: list[Trade] = []
    for path in captures:
        trades += trades_from_capture(path)
    for product, path in candles:
        rows = [
            c
            for c in read_candle_csv(path)
            if (start is None or c.start >= start) and (end is None or c.start < end)
        ]
        if not rows:
            raise CandleCsvError(f"{path}: no candles in the requested range")
        g = infer_granularity([c.start for c in rows])
        trades += trades_from_candles(rows, product, g, trades_per_candle=trades_per_candle, seed=seed)
    products = [t.product for t in trades]
    seen = {(t.product, t.trade_id) for t in trades}
    if len(seen) != len(products):
        raise ValueError("two sources give the same product the same trade ids; use one source per product")
    lo, hi = (start or 0) * US, (end or 2**40) * US
    return [t for t in trades if lo <= t.time_us < hi]


def shift_tape(trades: Sequence[Trade], seconds: int) -> list[Trade]:
    """The same market moved in time (by whole hours, so every candle keeps its shape)."""
    if seconds % 3600:
        raise ValueError("a tape moves by whole hours")
    return [replace(t, time_us=t.time_us + seconds * US) for t in trades]


@dataclass(frozen=True, slots=True)
class Halt:
    """``product`` does not trade in tape times [start_us, end_us) (heartbeats go on)."""

    product: str
    start_us: int
    end_us: int


def apply_halts(trades: Sequence[Trade], halts: Sequence[Halt]) -> list[Trade]:
    """The tape with no trades inside a halt; later ids close up, as Coinbase's stay consecutive."""
    out: list[Trade] = []
    removed: dict[str, int] = {}
    for t in sorted(trades, key=lambda t: (t.product, t.trade_id)):
        if any(h.product == t.product and h.start_us <= t.time_us < h.end_us for h in halts):
            removed[t.product] = removed.get(t.product, 0) + 1
        else:
            out.append(replace(t, trade_id=t.trade_id - removed.get(t.product, 0)))
    return out
