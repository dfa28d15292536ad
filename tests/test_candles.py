"""Exact trade and candle values: parsing, bucketing and merging, pinned against a plain-Python fold."""

import calendar
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from appliance.candles import (
    COINBASE_GRANULARITIES,
    HORIZONS,
    HOUR,
    MINUTE,
    TRADE_GRANULARITIES,
    Candle,
    Trade,
    aggregate,
    bucket_start,
    format_price,
    format_size,
    format_time,
    parse_price,
    parse_size_e8,
    parse_time,
    to_time_us,
)
from appliance.coinbase.messages import ProductRow
from tests.conftest import CAPTURE


def trade(trade_id: int, price: float, size_e8: int, t_us: int) -> Trade:
    return Trade("BTC-USD", trade_id, price, size_e8, t_us, "buy")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.00000001", 1), ("1", 100_000_000), ("0.1", 10_000_000), ("626.73889224", 62_673_889_224)],
)
def test_size_parses_exactly(text: str, expected: int) -> None:
    assert parse_size_e8(text) == expected
    assert parse_size_e8(format_size(expected)) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [("0", "size must be positive"), ("0.00000000", "size must be positive")]
    + [(t, "not a plain decimal with at most 8 decimals") for t in
       ("-1", "1e-8", "0.000000001", "NaN", "", " 1", "1.", ".5", "1234567890123")],
)  # fmt: skip
def test_size_rejects_what_is_not_a_positive_8_decimal(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"^{says}"):
        parse_size_e8(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [("0", "price must be positive"), ("0.00", "price must be positive")]
    + [(t, "not a plain decimal: ") for t in ("-3", "inf", "nan", "1e5", "1,5", "")],
)  # fmt: skip
def test_price_rejects_non_positive_or_non_plain(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"^{says}"):
        parse_price(text)


def test_rejections_quote_at_most_40_characters_of_the_input() -> None:
    for parse in (parse_size_e8, parse_price, parse_time):
        with pytest.raises(ValueError, match=r"'x+'") as err:
            parse("x" * 100)
        assert repr("x" * 40) in str(err.value)
        assert repr("x" * 41) not in str(err.value)


@pytest.mark.parametrize("price", [63514.6, 0.00001, 1774.92, 42288.06, 126296.0])
def test_price_text_round_trips(price: float) -> None:
    assert "e" not in format_price(price)
    assert parse_price(format_price(price)) == price


def test_time_round_trips_in_microseconds() -> None:
    dt = datetime(2026, 7, 7, 22, 58, 17, 164892, tzinfo=UTC)
    us = to_time_us(dt)
    assert format_time(us) == "2026-07-07T22:58:17.164892Z"
    assert to_time_us(datetime.fromisoformat("2026-07-07T22:58:17.164892+00:00")) == us
    assert to_time_us(dt.astimezone(UTC).replace(tzinfo=UTC) + timedelta(microseconds=1)) == us + 1
    with pytest.raises(ValueError, match=r"^timestamp has no time zone$"):
        to_time_us(dt.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1783465097", 1783465097),  # epoch digits are taken as they are
        ("0", 0),
        ("2026-07-07T22:58:17Z", calendar.timegm((2026, 7, 7, 22, 58, 17))),
        ("2026-07-07T22:58:17.999999Z", calendar.timegm((2026, 7, 7, 22, 58, 17))),  # whole seconds, floored
        ("2026-07-07T22:58:17", calendar.timegm((2026, 7, 7, 22, 58, 17))),  # no zone: UTC
        ("2026-07-07T23:58:17+01:00", calendar.timegm((2026, 7, 7, 22, 58, 17))),
        ("2026-07-07", calendar.timegm((2026, 7, 7, 0, 0, 0))),
        ("1969-12-31T23:59:59Z", -1),
    ],
)
def test_parse_time_reads_epoch_digits_and_iso_8601(text: str, expected: int) -> None:
    got = parse_time(text)
    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "-5", "1.5", "2026-07-07T25:00:00Z"])
def test_parse_time_refuses_anything_else_and_says_what_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not an ISO-8601 time or epoch seconds$"):
        parse_time(text)


def test_bucket_boundaries() -> None:
    t = to_time_us(datetime(2026, 7, 7, 22, 59, 0, tzinfo=UTC))
    assert bucket_start(t, 60) == t // 1_000_000
    assert bucket_start(t - 1, 60) == t // 1_000_000 - 60
    assert bucket_start(t, 3600) == t // 1_000_000 - 59 * 60


def test_coinbase_granularities_are_the_six_its_candles_endpoint_takes() -> None:
    """Coinbase Exchange REST /products/{id}/candles: 1 min, 5 min, 15 min, 1 h, 6 h, 1 day."""
    assert (MINUTE, HOUR) == (60, 60 * 60)
    assert COINBASE_GRANULARITIES == (60, 5 * 60, 15 * 60, 60 * 60, 6 * 60 * 60, 24 * 60 * 60)


def test_horizons_are_the_next_hour_and_15_minutes_built_from_trades_and_from_rest() -> None:
    assert HORIZONS == (60 * 60, 15 * 60)
    assert TRADE_GRANULARITIES == (60, 15 * 60, 60 * 60)  # minute candles, and each horizon's
    assert set(HORIZONS) <= set(COINBASE_GRANULARITIES)  # each horizon's history is Coinbase's candles


@pytest.mark.parametrize(
    ("product", "valid"),
    [("BTC-USD", True), ("A-B", True), ("1INCH-USD", True), ("ABCDEFGHIJKL-ABCDEFGHIJKL", True),
     ("ABCDEFGHIJKLM-USD", False), ("BTC-ABCDEFGHIJKLM", False), ("-USD", False), ("BTC-", False),
     ("btc-usd", False), ("BTC_USD", False), ("BTC-USD-X", False), ("BTC USD", False)],
)  # fmt: skip
def test_product_ids_are_base_dash_quote_of_1_to_12_capitals_or_digits(product: str, valid: bool) -> None:
    if valid:
        assert ProductRow(id=product, status="online").id == product
    else:
        with pytest.raises(ValueError, match="should match pattern"):
            ProductRow(id=product, status="online")


def test_trades_are_immutable_hashable_values() -> None:
    t = trade(1, 10.0, 5, 0)
    assert {t, trade(1, 10.0, 5, 0)} == {t}
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.price = 11.0  # type: ignore[misc]
    assert Candle(1.0, 2.0, 0.5, 1.5, 150_000_000, 3).volume == 1.5


def test_aggregate_is_ohlcv_in_trade_order() -> None:
    base = 1_700_000_000 * 1_000_000
    trades = [
        trade(1, 10.0, 5, base),
        trade(2, 12.5, 7, base + 10),
        trade(3, 9.0, 1, base + 20),
        trade(4, 11.0, 2, base + 30),
        trade(5, 20.0, 3, base + 61_000_000),
    ]
    candles = aggregate(trades, 60)
    assert candles[("BTC-USD", 1_700_000_000 - 1_700_000_000 % 60)] == Candle(10.0, 12.5, 9.0, 11.0, 15, 4)
    assert len(candles) == 2


def test_merging_in_pieces_equals_aggregating_at_once() -> None:
    base = 1_700_000_040 * 1_000_000
    trades = [trade(i, 100.0 + (i * 37) % 11, i, base + i * 1_000_000) for i in range(1, 50)]
    whole = aggregate(trades, 60)
    merged: dict[tuple[str, int], Candle] = {}
    for chunk in (trades[:7], trades[7:8], trades[8:30], trades[30:]):
        for key, c in aggregate(chunk, 60).items():
            if key in merged:
                merged[key].merge(c)
            else:
                merged[key] = c
    assert merged == whole


def capture_matches(shift_s: int = 0) -> list[dict[str, str]]:
    """The real capture's trades (match and last_match frames) as raw JSON, times moved by ``shift_s``."""
    rows = []
    for line in CAPTURE.read_text().splitlines():
        frame = json.loads(line)
        if frame["type"] in ("match", "last_match"):
            when = datetime.fromisoformat(frame["time"]) + timedelta(seconds=shift_s)
            rows.append(frame | {"time": when.isoformat()})
    return rows


def plain_fold(rows: list[dict[str, str]], unit: str) -> dict[tuple[str, int], tuple[float | int, ...]]:
    """OHLCV per (product, bucket) by hand: datetimes truncated to the minute or hour, Decimal volumes."""
    prices: dict[tuple[str, int], list[Decimal]] = {}
    sizes: dict[tuple[str, int], list[Decimal]] = {}
    for r in sorted(rows, key=lambda r: (r["product_id"], int(r["trade_id"]))):
        when = datetime.fromisoformat(r["time"]).replace(second=0, microsecond=0)
        if unit == "hour":
            when = when.replace(minute=0)
        key = (r["product_id"], calendar.timegm(when.utctimetuple()))
        prices.setdefault(key, []).append(Decimal(r["price"]))
        sizes.setdefault(key, []).append(Decimal(r["size"]))
    return {k: (float(p[0]), float(max(p)), float(min(p)), float(p[-1]), int(sum(sizes[k]) * 10**8), len(p))
            for k, p in prices.items()}  # fmt: skip


def as_trades(rows: list[dict[str, str]]) -> list[Trade]:
    return [
        Trade(r["product_id"], int(r["trade_id"]), parse_price(r["price"]), parse_size_e8(r["size"]),
              to_time_us(datetime.fromisoformat(r["time"])), r["side"])  # type: ignore[arg-type]
        for r in sorted(rows, key=lambda r: int(r["trade_id"]))
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("shift_s", "granularity", "unit", "buckets"),
    [
        # As captured (22:58:16 .. 22:59:16 UTC): both products cross the 22:59:00 minute boundary.
        (0, MINUTE, "minute", 4),
        (0, HOUR, "hour", 2),
        # Moved 75 s later (22:59:31 .. 23:00:31): the trades straddle the 23:00:00 hour boundary.
        (75, MINUTE, "minute", 4),
        (75, HOUR, "hour", 4),
    ],
)
def test_candles_of_the_real_capture_equal_a_plain_python_fold(
    shift_s: int, granularity: int, unit: str, buckets: int
) -> None:
    rows = capture_matches(shift_s)
    expected = plain_fold(rows, unit)
    got = aggregate(as_trades(rows), granularity)
    assert len(expected) == buckets
    assert {k: (c.open, c.high, c.low, c.close, c.volume_e8, c.trades) for k, c in got.items()} == expected
    assert sum(c.trades for c in got.values()) == len(rows) == 437
