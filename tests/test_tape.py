"""Candle tapes rebuild the real candles exactly; captures give the real trades."""

import time
from pathlib import Path

import httpx
import pytest

from appliance.candle_csv import CandleCsvError, infer_granularity, read_candle_csv
from appliance.candles import aggregate, parse_time
from appliance.replay.tape import load_tape, shift_tape
from tests.conftest import BTC_1H, BTC_1M, SEPT_2025, replay_process


@pytest.mark.parametrize(("path", "span"), [(BTC_1H, SEPT_2025), (BTC_1M, (1606070760, 1606157160))])
def test_generated_trades_aggregate_to_the_real_candles_exactly(path: Path, span: tuple[int, int]) -> None:
    real = [c for c in read_candle_csv(path) if span[0] <= c.start < span[1]]
    g = infer_granularity([c.start for c in real])
    trades = load_tape(candles=[("BTC-USD", path)], start=span[0], end=span[1])
    rebuilt = aggregate(trades, g)
    assert len(rebuilt) == len(real) > 500
    for c in real:
        got = rebuilt[("BTC-USD", c.start)]
        row = c.row()
        assert (got.open, got.high, got.low, got.close) == (row.open, row.high, row.low, row.close)
        assert got.volume_e8 == round(float(c.volume) * 1e8)  # exact: both are integers of 1e-8


def test_generated_trades_are_ordered_and_inside_their_candle() -> None:
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400)
    ids = [t.trade_id for t in trades]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    times = [t.time_us for t in trades]
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_tapes_are_deterministic_per_seed() -> None:
    a = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400, seed=1)
    b = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400, seed=1)
    c = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400, seed=2)
    assert a == b
    assert a != c


def test_capture_tape_holds_the_real_trades(capture_tape) -> None:
    products = {t.product for t in capture_tape}
    assert products == {"BTC-USD", "ETH-USD"}
    assert sum(t.product == "BTC-USD" for t in capture_tape) == 345  # 344 matches + the last_match


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("date,o,h,l,c,v\n", "header"),
        ("time,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,3,1,1\n", "inconsistent"),
        ("time,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,1,x,1\n", ":2:"),
        ("time,open,high,low,close,volume\n2024-01-01T00:10:00Z,1,2,1,1,1\n", "boundary"),
        (
            "time,open,high,low,close,volume\n2024-01-01T01:00:00Z,1,2,1,1,1\n2024-01-01T00:00:00Z,1,2,1,1,1\n",
            "ascending",
        ),
        ("time,open,high,low,close,volume\nyesterday,1,2,1,1,1\n", ":2:"),
    ],
)
def test_bad_candle_csv_names_file_line_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(CandleCsvError, match=message):
        list(read_candle_csv(path, 3600))


def test_a_moved_tape_keeps_every_candle() -> None:
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400)
    moved = shift_tape(trades, 425 * 86400 + 7 * 3600)
    before, after = aggregate(trades, 3600), aggregate(moved, 3600)
    assert [c for _, c in sorted(before.items())] == [c for _, c in sorted(after.items())]
    assert min(s for _, s in after) == SEPT_2025[0] + 425 * 86400 + 7 * 3600
    with pytest.raises(ValueError, match="whole hours"):
        shift_tape(trades, 1800)


def test_replay_at_now_starts_the_market_clock_at_the_present() -> None:
    with replay_process(["--candles", f"BTC-USD={BTC_1H}", "--from", "2026-04-01", "--start-at", "2026-04-20",
                         "--at-now"]) as port:  # fmt: skip
        status = httpx.get(f"http://127.0.0.1:{port}/replay/status").json()
    clock = parse_time(status["clock"].split(".")[0] + "Z")
    assert 0 <= time.time() - clock < 3600
