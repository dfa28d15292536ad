"""The feed client against the replay's Coinbase: refusals, the wrong protocol, outages, slow reading.

Also behaviour that needs no server: back-off and log throttling.
"""

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from appliance.candles import Trade
from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.feed import CoinbaseFeed, Connected, Disconnected, FeedEvent, FeedProtocolError
from appliance.coinbase.messages import HeartbeatMessage, MatchMessage
from appliance.health import Conditions
from appliance.logs import ThrottledLog
from appliance.replay.server import Faults, ReplayServer
from appliance.settings import EXCHANGE_FEED_URL
from tests.conftest import ADVANCED_TRADE_CAPTURE, REPO, free_port


def test_backoff_grows_then_stays_capped_through_a_long_outage() -> None:
    early = max(backoff_delay(1, 30.0) for _ in range(200))
    assert early <= 0.5
    # A day of failed dials must not overflow (2**1100 is no float) and must stay under the cap.
    assert all(0 <= backoff_delay(n, 30.0) <= 30.0 for n in (10, 1023, 1100, 10**6))
    assert max(backoff_delay(10**6, 30.0) for _ in range(200)) > 15  # full jitter spans the range


def test_throttled_log_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottledLog(logging.getLogger("t"), interval_s=0.2)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            throttled.warning("malformed", "feed frame rejected", reason="malformed")
        throttled.warning("duplicate", "feed frame rejected", reason="duplicate")
        assert len(caplog.records) == 2  # one line per reason per interval
        time.sleep(0.25)
        throttled.warning("malformed", "feed frame rejected", reason="malformed")
    assert caplog.records[-1].suppressed == 4  # type: ignore[attr-defined]


async def collect(
    feed: CoinbaseFeed, until: Callable[[list[FeedEvent]], bool], timeout: float = 20
) -> list[FeedEvent]:
    """The feed's events until ``until`` holds for them (or an AssertionError after ``timeout``)."""
    events: list[FeedEvent] = []

    async def read() -> None:
        async for event in feed.events():
            events.append(event)
            if until(events):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"the feed did not get there in {timeout}s: {events[-5:]}") from None
    return events


def trades_of(events: list[FeedEvent], product: str) -> list[int]:
    return [e.trade_id for e in events if isinstance(e, MatchMessage) and e.product_id == product]


@pytest.fixture
async def replay(capture_tape: list[Trade]) -> AsyncIterator[Callable[..., object]]:
    """Start a replay server of the real captured trades with the given options; closed at the end."""
    servers: list[ReplayServer] = []

    async def start(**options: object) -> tuple[ReplayServer, str]:
        server = ReplayServer(capture_tape, heartbeat_s=0.1, **options)  # type: ignore[arg-type]
        servers.append(server)
        return server, f"ws://127.0.0.1:{await server.start()}"

    yield start
    for server in servers:
        await server.close()


@pytest.mark.parametrize("variant", ["keep_open", "close", "keep_open_unnamed"])
async def test_a_refused_product_never_silences_the_others(replay, variant: str) -> None:
    """Coinbase ignores a whole subscribe naming a product it lacks; the others must still flow."""
    faults = Faults(subscribe_error="close" if variant == "close" else "keep_open",
                    refusal_names_product=not variant.endswith("unnamed"))  # fmt: skip
    server, url = await replay(faults=faults)
    health = Conditions()
    feed = CoinbaseFeed(url, ["BTC-USD", "NOPE-USD", "ETH-USD"], reconnect_max_s=0.2, health=health)
    events = await collect(
        feed, lambda ev: len(trades_of(ev, "BTC-USD")) >= 50 and bool(trades_of(ev, "ETH-USD"))
    )
    assert set(feed.refused) == {"NOPE-USD"}
    assert "not a valid product" in feed.refused["NOPE-USD"]
    problem = health.of("product", "NOPE-USD")
    assert problem is not None
    assert "refused" in problem.message
    assert feed.connected
    assert server.injected["refused"] >= 1
    connects = sum(isinstance(e, Connected) for e in events)
    assert connects == (2 if variant == "close" else 1)  # one reconnect when the socket is closed
    assert not any(
        isinstance(e, MatchMessage | HeartbeatMessage) and e.product_id == "NOPE-USD" for e in events
    )


async def test_the_subscription_follows_what_ingest_wants_on_the_open_connection(replay) -> None:
    server, url = await replay()
    feed = CoinbaseFeed(url, ["BTC-USD"], reconnect_max_s=0.2)
    events: list[FeedEvent] = []

    async def read() -> None:
        async for event in feed.events():
            events.append(event)
            if isinstance(event, MatchMessage) and len(trades_of(events, "BTC-USD")) == 5:
                feed.subscribe(["BTC-USD", "ETH-USD"])  # a daily product check adds one
            if trades_of(events, "ETH-USD"):
                return

    await asyncio.wait_for(read(), 20)
    assert sum(isinstance(e, Connected) for e in events) == 1  # no reconnect needed
    first_eth = next(e for e in events if isinstance(e, MatchMessage) and e.product_id == "ETH-USD")
    assert first_eth.type == "last_match"
    assert server.injected["refused"] == 0


@pytest.fixture
async def advanced_trade_feed() -> AsyncIterator[str]:
    """A WebSocket server speaking Coinbase's Advanced Trade protocol: the real capture's frames."""
    frames = ADVANCED_TRADE_CAPTURE.read_text().splitlines()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # whatever the client subscribes to
        for frame in frames:
            await ws.send(frame)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_an_advanced_trade_url_is_refused_with_the_right_one(advanced_trade_feed: str) -> None:
    feed = CoinbaseFeed(advanced_trade_feed, ["BTC-USD"], reconnect_max_s=0.2)
    with pytest.raises(FeedProtocolError, match="Advanced Trade") as refused:
        await collect(feed, lambda ev: False)
    assert EXCHANGE_FEED_URL in str(refused.value)


async def test_the_cli_exits_2_naming_the_exchange_feed(advanced_trade_feed: str, tmp_path: Path) -> None:
    """Refused at start: by the first frames of a feed speaking it, and by the settings for Coinbase's
    own Advanced Trade host, before anything runs."""
    env = os.environ | {"CRYPTOPI_DATA_DIR": str(tmp_path), "CRYPTOPI_COINBASE_WS_URL": advanced_trade_feed,
                        "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{free_port()}"}  # fmt: skip
    ingest = [sys.executable, "-m", "appliance", "ingest"]
    # The server runs on this test's loop: the CLI waits in a thread.
    out = await asyncio.to_thread(subprocess.run, ingest, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    said = (
        "speaks Coinbase's Advanced Trade protocol (channel market_trades); cryptopi reads the Exchange feed"
    )
    setting = f"CRYPTOPI_COINBASE_WS_URL={advanced_trade_feed}"
    assert f"invalid configuration:\n  {setting} {said}: set {EXCHANGE_FEED_URL}" in out.stdout
    env["CRYPTOPI_COINBASE_WS_URL"] = "wss://advanced-trade-ws.coinbase.com"
    out = await asyncio.to_thread(subprocess.run, ingest, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
    assert out.returncode == 2
    said = "advanced-trade-ws.coinbase.com is Coinbase's Advanced Trade feed, another protocol"
    assert f"CRYPTOPI_COINBASE_WS_URL: Value error, {said}; cryptopi reads the Exchange feed: " \
           f"{EXCHANGE_FEED_URL}" in out.stdout  # fmt: skip


async def test_an_unreachable_coinbase_is_said_once_with_host_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    health = Conditions()
    feed = CoinbaseFeed("wss://cryptopi-no-such-host.invalid/feed", ["BTC-USD"], reconnect_max_s=0.05,
                        health=health)  # fmt: skip
    events = await collect(feed, lambda ev: sum(isinstance(e, Disconnected) for e in ev) >= 4)
    problem = health.of("coinbase")
    assert problem is not None
    assert problem.message == "Coinbase feed unreachable (cryptopi-no-such-host.invalid)"
    assert "gaierror" in problem.detail["last_error"]
    assert problem.detail["failures"] >= 4
    assert problem.detail["next_retry_s"] >= 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [problem.message]  # once, not per retry
    assert all(getattr(r, "host", None) == "cryptopi-no-such-host.invalid" for r in caplog.records
               if r.getMessage() == "feed disconnected")  # fmt: skip
    assert len(events) >= 4


async def test_a_client_that_stops_reading_is_dropped_as_a_slow_consumer(replay) -> None:
    """The replay does what Coinbase documents (ErrSlowConsume): the ingester's reader must keep up."""
    server, url = await replay(faults=Faults(slow_consumer_s=0.5))
    async with websockets.connect(url, max_queue=1) as ws:
        await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["matches"]}))
        deadline = time.monotonic() + 20
        while not server.injected["slow_consumer"]:  # never reads: the server's socket backs up
            assert time.monotonic() < deadline, server.status()
            server.inject("BTC-USD", json.dumps({"type": "pad", "data": "x" * 60_000}))
            await asyncio.sleep(0.01)
        frames = []
        with contextlib.suppress(websockets.ConnectionClosed):  # the backlog, the error, then the close
            while True:
                frames.append(await ws.recv())
    assert json.loads(frames[-1]) == {"type": "error", "message": "ErrSlowConsume",
                                      "reason": "too many backed up messages"}  # fmt: skip
