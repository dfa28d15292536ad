"""The replay server speaks Coinbase's REST: cursor pagination, newest-first rows, its limits."""

from collections.abc import AsyncIterator

import httpx
import pytest

from appliance.candles import aggregate
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.replay.server import ReplayServer
from appliance.replay.tape import load_tape
from tests.conftest import BTC_1H, SEPT_2025


@pytest.fixture
async def server() -> AsyncIterator[tuple[ReplayServer, str]]:
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 14 * 86400)
    # Everything has happened: the clock starts after the last trade.
    srv = ReplayServer(trades, start_at_us=trades[-1].time_us, rest_rate_limit=0)
    port = await srv.start()
    yield srv, f"http://127.0.0.1:{port}"
    await srv.close()


async def test_trades_pages_walk_back_by_cursor_without_overlap(server) -> None:
    srv, url = server
    tape = srv.products["BTC-USD"].trades
    async with httpx.AsyncClient(base_url=url) as http:
        first = await http.get("/products/BTC-USD/trades", params={"limit": 100})
        rows = first.json()
        assert [r["trade_id"] for r in rows] == [t.trade_id for t in tape[-100:]][::-1]  # newest first
        assert first.headers["cb-after"] == str(rows[-1]["trade_id"])
        older = await http.get(
            "/products/BTC-USD/trades", params={"limit": 100, "after": first.headers["cb-after"]}
        )
        assert older.json()[0]["trade_id"] == rows[-1]["trade_id"] - 1
        newer = await http.get("/products/BTC-USD/trades", params={"limit": 5, "before": tape[10].trade_id})
        assert [r["trade_id"] for r in newer.json()] == [t.trade_id for t in tape[11:16]][::-1]
        assert (await http.get("/products/BTC-USD/trades", params={"limit": 1001})).status_code == 400
        assert (await http.get("/products/NOPE-USD/trades")).status_code == 404


async def test_client_fetches_a_gap_across_pages(server) -> None:
    srv, url = server
    tape = srv.products["BTC-USD"].trades
    async with CoinbaseRest(url) as rest:
        lo, hi = tape[5].trade_id, tape[2100].trade_id
        got = await rest.trades_between("BTC-USD", lo, hi)
    assert got == [t for t in tape if lo < t.trade_id <= hi]


async def test_candles_are_newest_first_and_limited_to_300(server) -> None:
    srv, url = server
    tape = srv.products["BTC-USD"].trades
    async with httpx.AsyncClient(base_url=url) as http:
        start, end = SEPT_2025[0], SEPT_2025[0] + 10 * 3600
        resp = await http.get(
            "/products/BTC-USD/candles",
            params={"granularity": 3600, "start": "2025-09-01T00:00:00Z", "end": "2025-09-01T10:00:00Z"},
        )
        rows = resp.json()
        assert [r[0] for r in rows] == list(range(end, start - 1, -3600))
        expected = aggregate(tape, 3600)[("BTC-USD", start)]
        assert rows[-1] == [
            start,
            expected.low,
            expected.high,
            expected.open,
            expected.close,
            expected.volume,
        ]
        too_many = await http.get(
            "/products/BTC-USD/candles",
            params={"granularity": 60, "start": "2025-09-01T00:00:00Z", "end": "2025-09-01T10:00:00Z"},
        )
        assert too_many.status_code == 400
        assert "300" in too_many.json()["message"]
        assert (await http.get("/products/BTC-USD/candles", params={"granularity": 120})).status_code == 400


async def test_rate_limit_answers_429_and_the_client_backs_off() -> None:
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400)
    srv = ReplayServer(trades, start_at_us=trades[-1].time_us, rest_rate_limit=2, rest_burst=2)
    port = await srv.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            codes = [(await http.get("/products/BTC-USD/trades")).status_code for _ in range(6)]
        assert 429 in codes
        async with CoinbaseRest(f"http://127.0.0.1:{port}", rate_per_s=10) as rest:
            pages = [await rest.trades("BTC-USD", limit=10) for _ in range(6)]
        assert all(len(p.trades) == 10 for p in pages)
    finally:
        await srv.close()


async def test_client_error_is_clear_and_not_retried(server) -> None:
    _, url = server
    async with CoinbaseRest(url) as rest:
        with pytest.raises(CoinbaseRestError, match="HTTP 404"):
            await rest.trades("NOPE-USD")
        with pytest.raises(ValueError, match="granularity 120"):
            await rest.candles("BTC-USD", 120, 0, 1200)
