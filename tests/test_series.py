"""The pure decisions behind ingest and history: the history/trade splice, the gap step, the holes."""

from decimal import Decimal

import pytest

from appliance.candles import HOUR, US, CandleRow, IngestState, check_ohlcv, splice
from appliance.history import missing_span
from appliance.ingest import next_step

T0 = 1_700_000_000 // HOUR * HOUR  # an hour boundary


def rows(*starts: int, close: float = 1.0) -> list[CandleRow]:
    return [CandleRow(s, close, close, close, close, 1.0) for s in starts]


def hours(*k: int) -> list[int]:
    return [T0 + i * HOUR for i in k]


def coverage(first_us: int | None, last_us: int) -> IngestState:
    return IngestState("BTC-USD", 1, 2, last_us, first_us)


def test_without_ingest_the_series_is_the_history() -> None:
    history = rows(*hours(0, 1, 2))
    assert splice(history, [], None, HOUR) == history


def test_trade_candles_count_from_the_first_whole_bucket_and_never_the_open_one() -> None:
    history = rows(*hours(0, 1, 2, 3), close=1.0)
    built = rows(*hours(1, 2, 3, 4), close=2.0)
    # Ingest began 10 s into hour 1 (so hour 1 is partial) and is now inside hour 4 (still open).
    state = coverage((T0 + HOUR + 10) * US, (T0 + 4 * HOUR + 5) * US)
    got = splice(history, built, state, HOUR)
    assert [r.start for r in got] == hours(0, 1, 2, 3)
    assert [r.close for r in got] == [1.0, 1.0, 2.0, 2.0]  # history until hour 2, trades from there


def test_ingest_that_began_on_a_boundary_covers_that_bucket() -> None:
    state = coverage((T0 + HOUR) * US, (T0 + 3 * HOUR) * US)
    got = splice(rows(*hours(0, 1), close=1.0), rows(*hours(1, 2), close=2.0), state, HOUR)
    assert [(r.start, r.close) for r in got] == [(hours(0)[0], 1.0), *((s, 2.0) for s in hours(1, 2))]
    late = coverage((T0 + HOUR) * US + 1, (T0 + 3 * HOUR) * US)  # a microsecond after: hour 1 is partial
    got = splice(rows(*hours(0, 1), close=1.0), rows(*hours(1, 2), close=2.0), late, HOUR)
    assert [(r.start, r.close) for r in got] == [*((s, 1.0) for s in hours(0, 1)), (hours(2)[0], 2.0)]


def test_unknown_coverage_trusts_trade_candles_only_after_the_history() -> None:
    state = coverage(None, (T0 + 5 * HOUR) * US)
    got = splice(rows(*hours(0, 1, 2), close=1.0), rows(*hours(1, 2, 3, 4), close=2.0), state, HOUR)
    assert [(r.start, r.close) for r in got] == [
        *((s, 1.0) for s in hours(0, 1, 2)),
        *((s, 2.0) for s in hours(3, 4)),
    ]


def test_unknown_coverage_and_no_history_trusts_no_trade_candle() -> None:
    state = coverage(None, (T0 + 5 * HOUR) * US)
    assert splice([], rows(*hours(1, 2, 3, 4)), state, HOUR) == []


def test_with_no_whole_trade_candle_history_stops_at_the_open_bucket() -> None:
    state = coverage((T0 + 2 * HOUR + 1) * US, (T0 + 2 * HOUR + 9) * US)
    got = splice(rows(*hours(0, 1, 2)), rows(*hours(2)), state, HOUR)
    assert [r.start for r in got] == hours(0, 1)


@pytest.mark.parametrize(
    ("last", "trade", "step"),
    [(None, 7, "start"), (5, 6, "apply"), (5, 5, "duplicate"), (5, 4, "duplicate"), (5, 7, "repair"),
     (0, 1, "apply"), (1, 1, "duplicate")],
)  # fmt: skip
def test_next_step_of_a_trade(last: int | None, trade: int, step: str) -> None:
    assert next_step(last, trade) == step


def test_missing_span_covers_exactly_the_holes() -> None:
    open_hour = T0 + 10 * HOUR
    assert missing_span(hours(*range(10)), open_hour, 10, HOUR) is None
    assert missing_span(hours(0, 1, 2, 5, 6, 7, 8, 9), open_hour, 10, HOUR) == (T0 + 3 * HOUR, T0 + 5 * HOUR)
    assert missing_span([], open_hour, 3, HOUR) == (T0 + 7 * HOUR, T0 + 10 * HOUR)
    # Hours older than the count asked for are not holes.
    assert missing_span(hours(5, 6, 7, 8, 9), open_hour, 5, HOUR) is None


@pytest.mark.parametrize(
    ("ohlcv", "message"),
    [((1, 2, 0.5, 1.5, 3), None), ((1, 1, 1, 1, 0), None),
     ((1, 2, 0.5, 3, 1), "inconsistent"), ((1, 2, 1.5, 1.8, 1), "inconsistent"),
     ((1, 2, 0, 1, 1), "inconsistent"), ((1, 2, 0.5, 1, -1), "inconsistent"),
     ((float("nan"), 2, 0.5, 1, 1), "non-finite"), ((1, float("inf"), 0.5, 1, 1), "non-finite"),
     ((Decimal("1.5"), Decimal(2), Decimal("0.5"), Decimal(1), Decimal(0)), None),
     ((Decimal("NaN"), Decimal(2), Decimal("0.5"), Decimal(1), Decimal(0)), "non-finite")],
)  # fmt: skip
def test_one_ohlcv_rule_for_floats_and_decimals(ohlcv: tuple[float, ...], message: str | None) -> None:
    if message is None:
        check_ohlcv(*ohlcv)
    else:
        with pytest.raises(ValueError, match=message):
            check_ohlcv(*ohlcv)
