"""Hostile input: every kind of bad frame is counted under its reason and changes no candle."""

import asyncio
from pathlib import Path

from appliance.coinbase.rest import CoinbaseRest
from appliance.ingest import Ingester
from appliance.replay.hostile import HostileFrame, catalogue
from appliance.replay.server import ReplayServer
from appliance.store import Store
from tests.conftest import MetricDelta, assert_store_matches_tape, make_settings, wait_for

PRODUCTS = ("BTC-USD", "ETH-USD")
REASONS = (
    "malformed",
    "unknown_type",
    "unknown_product",
    "duplicate",
    "unconfirmed",
    "server_error",
    "binary_frame",
    "frame_too_large",
    "protocol_error",
)


async def check_frame(server: ReplayServer, ingester: Ingester, frame: HostileFrame) -> None:
    """Send one frame on a live connection; exactly its reason's counter grows, and no trade is taken."""
    grown = MetricDelta()
    await wait_for(
        lambda: ingester.feed.connected and server.status()["subscribers"] == 1, 10, "a subscriber"
    )
    assert server.inject("BTC-USD", frame.payload, text=frame.text) == 1
    if frame.reason is None:
        await wait_for(lambda: grown("cryptopi_feed_messages_total", type="other") >= 1, 5, frame.kind)
    else:
        reason = frame.reason
        await wait_for(
            lambda: grown("cryptopi_feed_rejected_total", reason=reason) >= 1,
            5,
            f"{frame.kind} to be counted as {reason}",
        )
    if frame.closes:
        await wait_for(lambda: grown("cryptopi_feed_connects_total") >= 1, 10, "a reconnect")
    await asyncio.sleep(0.3)  # anything else the frame might wrongly cause has time to show
    counts = {r: grown("cryptopi_feed_rejected_total", reason=r) for r in REASONS}
    expected = dict.fromkeys(REASONS, 0.0)
    if frame.reason:
        expected[frame.reason] = 1.0
    if frame.closes:  # each product's last_match on the new connection repeats a trade held
        expected["duplicate"] = len(PRODUCTS)
    assert counts == expected, frame.kind
    assert grown("cryptopi_trades_ingested_total", product="BTC-USD", via="feed") == 0, frame.kind


async def test_every_hostile_frame_is_counted_and_harmless(tmp_path: Path, capture_tape, running) -> None:
    server = ReplayServer(capture_tape, heartbeat_s=0.2)
    port = await server.start()
    settings = make_settings(tmp_path, port)
    store, reader = Store(settings.db_path), Store(settings.db_path, readonly=True)
    last_btc = max((t for t in capture_tape if t.product == "BTC-USD"), key=lambda t: t.trade_id)
    frames = catalogue(last_btc)
    assert len(frames) >= 30
    try:
        async with CoinbaseRest(settings.coinbase_rest_url) as rest:
            ingester = Ingester(settings, store, rest)
            running(ingester.run())
            await wait_for(
                lambda: server.done and ingester.cursors["BTC-USD"].last_trade_id == last_btc.trade_id,
                30,
                "the tape to be ingested",
            )
            for frame in frames:
                await check_frame(server, ingester, frame)
            ingester.commit()
    finally:
        await server.close()
    assert_store_matches_tape(reader, capture_tape, PRODUCTS)
