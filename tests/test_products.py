"""Products: checked against Coinbase's list, patterns resolved, fifty on one connection, fair REST."""

import asyncio
from pathlib import Path

import pytest

from appliance.candles import Trade
from appliance.coinbase.messages import ProductRow
from appliance.coinbase.rest import CoinbaseRest, FairLimiter
from appliance.health import Conditions
from appliance.helpers.config import ConfigError
from appliance.ingest import Ingester
from appliance.metrics import FEED_CONNECTS
from appliance.products import judge, resolve, resolve_settings
from appliance.replay.server import ReplayServer
from appliance.replay.tape import load_tape
from appliance.settings import MAX_PRODUCTS, load_settings
from appliance.store import Store
from tests.conftest import BTC_1H, ETH_1H, SEPT_2025, assert_store_matches_tape, make_settings, wait_for

#: Fifty products, each a real hourly series (the bundled BTC-USD and ETH-USD candles, in turn).
FIFTY = [f"P{i:02d}-USD" for i in range(1, MAX_PRODUCTS + 1)]


def row(product: str, status: str = "online", **flags: bool) -> ProductRow:
    return ProductRow(id=product, status=status, **flags)


def test_judge_leaves_out_what_the_feed_cannot_serve() -> None:
    listing = [row("BTC-USD"), row("ETH-USD", trading_disabled=True), row("LUNA-USD", "delisted"),
               row("OFF-USD", "offline"), row("INT-USD", "internal")]  # fmt: skip
    verdicts = {v.product: v.left_out for v in judge(["BTC-USD", "ETH-USD", "NOPE-USD", "LUNA-USD",
                                                      "OFF-USD", "INT-USD"], listing)}  # fmt: skip
    assert verdicts["BTC-USD"] is None
    assert verdicts["ETH-USD"] is None  # halted, not gone: kept, so its first trade after is not missed
    assert verdicts["OFF-USD"] is None
    assert (
        verdicts["NOPE-USD"]
        == "not a Coinbase product (GET /products does not list it): left out of the feed"
    )
    assert verdicts["LUNA-USD"] == "Coinbase lists it as delisted: left out of the feed"
    assert verdicts["INT-USD"] == "Coinbase lists it as internal: left out of the feed"


def test_patterns_resolve_to_the_online_products_in_order() -> None:
    listing = [row("SOL-USD"), row("BTC-USD"), row("BTC-EUR"), row("LUNA-USD", "delisted"), row("ETH-USD")]
    assert resolve(["*-USD"], listing) == ("BTC-USD", "ETH-USD", "SOL-USD")
    assert resolve(["ETH-USD", "BTC-*"], listing) == ("ETH-USD", "BTC-EUR", "BTC-USD")
    with pytest.raises(ValueError, match=r"\*-GBP matches no product"):
        resolve(["*-GBP"], listing)
    with pytest.raises(ValueError, match="comes to 3 products; at most 2"):
        resolve(["*-USD"], listing, limit=2)


def test_settings_take_fifty_products_or_patterns_and_say_what_is_wrong(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert load_settings(products=",".join(FIFTY)).products == tuple(FIFTY)
    assert load_settings(products="*-USD,BTC-EUR").product_patterns == ("*-USD",)
    for bad, said in [(",".join([*FIFTY, "X-USD"]), "51 products; at most 50"),
                      ("btc usd", "is not a Coinbase product id like BTC-USD"),
                      ("*", "is not a Coinbase product id")]:  # fmt: skip
        with pytest.raises(ConfigError):
            load_settings(products=bad)
        assert said in capsys.readouterr().out


async def test_the_limiter_takes_products_in_turn() -> None:
    """A product with twenty requests waiting never makes another wait for all twenty (ordering only)."""
    limiter = FairLimiter(rate_per_s=500)
    order: list[str] = []

    async def ask(key: str) -> None:
        await limiter.wait(key)
        order.append(key)

    backfill = [asyncio.create_task(ask("BTC-USD")) for _ in range(20)]
    await asyncio.sleep(0)  # all twenty are waiting
    repair = [asyncio.create_task(ask("ETH-USD")) for _ in range(2)]
    await asyncio.gather(*backfill, *repair)
    # BTC-USD's first went at once and its second was next in turn; then they alternate (FIFO: 20, 21).
    assert [i for i, key in enumerate(order) if key == "ETH-USD"] == [2, 4]


@pytest.fixture(scope="module")
def fifty_tape() -> list[Trade]:
    """Three days of fifty products, rebuilt from real hourly candles (about 25,000 trades)."""
    days = (SEPT_2025[0], SEPT_2025[0] + 3 * 86400)
    tapes = [load_tape(candles=[(p, BTC_1H if i % 2 else ETH_1H)], start=days[0], end=days[1], seed=i)
             for i, p in enumerate(FIFTY)]  # fmt: skip
    return [t for tape in tapes for t in tape]


async def test_fifty_products_ingest_exactly_on_one_connection(tmp_path: Path, fifty_tape, running) -> None:
    server = ReplayServer(fifty_tape, heartbeat_s=0.2, rest_rate_limit=0)
    port = await server.start()
    connects = FEED_CONNECTS._value.get()
    try:
        settings = make_settings(tmp_path, port, products=("P*-USD",))
        health = Conditions()
        async with CoinbaseRest.from_settings(settings, health) as rest:
            settings = await resolve_settings(settings, rest)
            assert settings.products == tuple(FIFTY)
            store, reader = Store(settings.db_path), Store(settings.db_path, readonly=True)
            ingester = Ingester(settings, store, rest, health=health)
            running(ingester.run())
            last = {p: max(t.trade_id for t in fifty_tape if t.product == p) for p in FIFTY}

            def done() -> bool:
                return all((s := reader.ingest_state(p)) and s.last_trade_id == last[p] for p in FIFTY)

            await wait_for(done, 120, "fifty products to be ingested")
            status = server.status()
    finally:
        await server.close()
    assert status["subscribers"] == 1
    assert status["requests"] == {"subscribe": 1}  # all fifty in one subscribe on one connection
    assert FEED_CONNECTS._value.get() == connects + 1
    assert health.current() == []
    assert_store_matches_tape(reader, fifty_tape, FIFTY)
