"""Exact trade and candle values: parsing, bucketing and merging."""

from datetime import UTC, datetime, timedelta

import pytest

from appliance.candles import (
    Candle,
    Trade,
    aggregate,
    bucket_start,
    format_price,
    format_size,
    format_time,
    parse_price,
    parse_size_e8,
    to_time_us,
)


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
    "text", ["0", "0.00000000", "-1", "1e-8", "0.000000001", "NaN", "", " 1", "1.", ".5"]
)
def test_size_rejects_what_is_not_a_positive_8_decimal(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_size_e8(text)


@pytest.mark.parametrize("text", ["0", "0.00", "-3", "inf", "nan", "1e5", "1,5"])
def test_price_rejects_non_positive_or_non_plain(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_price(text)


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
    with pytest.raises(ValueError, match="zone"):
        to_time_us(dt.replace(tzinfo=None))


def test_bucket_boundaries() -> None:
    t = to_time_us(datetime(2026, 7, 7, 22, 59, 0, tzinfo=UTC))
    assert bucket_start(t, 60) == t // 1_000_000
    assert bucket_start(t - 1, 60) == t // 1_000_000 - 60
    assert bucket_start(t, 3600) == t // 1_000_000 - 59 * 60


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
