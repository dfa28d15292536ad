"""The replay server speaks Coinbase's REST: cursor pagination, newest-first rows, its limits."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets

from appliance.candles import US, aggregate
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.health import Conditions
from appliance.replay.server import Faults, ReplayServer
from appliance.replay.tape import Halt, load_tape
from tests.conftest import BTC_1H, ETH_1H, SEPT_2025


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


async def test_products_list_statuses_and_halts() -> None:
    trades = load_tape(candles=[("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)], start=SEPT_2025[0],
                       end=SEPT_2025[0] + 86400)  # fmt: skip
    halt = Halt("ETH-USD", (SEPT_2025[0] + 6 * 3600) * US, (SEPT_2025[0] + 12 * 3600) * US)
    srv = ReplayServer(trades, start_at_us=halt.start_us + 1, listed={"LUNA-USD": "delisted"}, halts=[halt])
    port = await srv.start()
    try:
        async with CoinbaseRest(f"http://127.0.0.1:{port}") as rest:
            listing = {r.id: r for r in await rest.products()}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            one = (await http.get("/products/LUNA-USD")).json()
            missing = await http.get("/products/NOPE-USD")
    finally:
        await srv.close()
    assert listing["BTC-USD"].halted_by == ()
    assert listing["ETH-USD"].halted_by == ("trading_disabled", "cancel_only")  # halted now
    assert listing["LUNA-USD"].status == "delisted"
    assert one["status"] == "delisted"
    assert missing.status_code == 404
    # During the halt no trade happens: the tape closes up its ids, as Coinbase's stay consecutive.
    eth = srv.products["ETH-USD"].trades
    assert [t.trade_id for t in eth] == list(range(eth[0].trade_id, eth[0].trade_id + len(eth)))
    assert not [t for t in eth if halt.start_us <= t.time_us < halt.end_us]


async def test_rest_failures_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    """5xx answers, Cloudflare's HTML pages and stalls past the timeout are retried until they pass."""
    caplog.set_level(logging.INFO)
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400)
    faults = Faults(rest_error_rate=0.4, rest_stall_rate=0.2, rest_stall_s=1.0, seed=3)
    srv = ReplayServer(trades, start_at_us=trades[-1].time_us, rest_rate_limit=0, faults=faults)
    port = await srv.start()
    health = Conditions()
    try:
        async with CoinbaseRest(f"http://127.0.0.1:{port}", timeout_s=0.3, max_backoff_s=0.2, max_attempts=20,
                                health=health) as rest:  # fmt: skip
            pages = [await rest.trades("BTC-USD", limit=10) for _ in range(10)]
    finally:
        await srv.close()
    assert all(len(p.trades) == 10 for p in pages)
    assert {k: v > 0 for k, v in srv.injected.items()} == {
        "rest_5xx": True,
        "rest_html": True,
        "rest_stalled": True,
    }
    retries = {getattr(r, "detail", "") for r in caplog.records if r.getMessage() == "coinbase rest retry"}
    assert "HTTP 520: api.exchange.coinbase.com | 520: Web server is returning an unknown error" in retries
    assert "HTTP 503: service unavailable" in retries
    assert any(d.startswith("ReadTimeout") for d in retries)
    assert health.current() == []  # working again


async def test_failing_rest_is_said_once_naming_host_and_error(caplog: pytest.LogCaptureFixture) -> None:
    trades = load_tape(candles=[("BTC-USD", BTC_1H)], start=SEPT_2025[0], end=SEPT_2025[0] + 86400)
    srv = ReplayServer(
        trades, start_at_us=trades[-1].time_us, rest_rate_limit=0, faults=Faults(rest_error_rate=1)
    )
    port = await srv.start()
    health = Conditions()
    try:
        async with CoinbaseRest(f"http://127.0.0.1:{port}", max_backoff_s=0.05, max_attempts=6,
                                health=health) as rest:  # fmt: skip
            with pytest.raises(CoinbaseRestError, match="gave up after 6 attempts: HTTP 5"):
                await rest.trades("BTC-USD")
    finally:
        await srv.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"Coinbase REST failing (127.0.0.1:{port})"]  # once, from the third failure on
    problem = health.of("coinbase-rest")
    assert problem is not None
    assert problem.detail["attempt"] == 6
    assert problem.detail["last_error"].startswith("HTTP 5")


async def test_rest_can_lag_behind_the_feed(capture_tape) -> None:
    """A trade the feed has sent is not known to REST for ``rest_lag_s``: the client must wait for it."""
    srv = ReplayServer(capture_tape, faults=Faults(rest_lag_s=3.0), rest_rate_limit=0)
    port = await srv.start()
    try:
        async with (
            websockets.connect(f"ws://127.0.0.1:{port}") as ws,
            CoinbaseRest(f"http://127.0.0.1:{port}") as rest,
        ):
            await ws.send(
                json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["matches"]})
            )
            seen = 0
            while seen < 20:  # live matches, just sent
                msg = json.loads(await ws.recv())
                seen += msg["type"] == "match"
            newest = msg["trade_id"]

            async def known() -> int:
                return max((t.trade_id for t in (await rest.trades("BTC-USD")).trades), default=0)

            assert await known() < newest
            deadline = time.monotonic() + 30
            while await known() < newest:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await srv.close()
