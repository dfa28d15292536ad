"""Products: checked against Coinbase's list, patterns resolved, fifty on one connection, fair REST."""

import asyncio
import logging
from pathlib import Path
from typing import cast

import pytest

from appliance.candles import Trade
from appliance.coinbase.messages import ProductRow
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError, FairLimiter
from appliance.health import Conditions
from appliance.helpers.config import ConfigError
from appliance.ingest import Ingester
from appliance.metrics import FEED_CONNECTS
from appliance.products import ProductWatch, judge, resolve, resolve_settings
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
    # ? stands for one character; an id without * or ? is kept as given, listed or not.
    assert resolve(["???-USD", "LUNA-USD"], listing) == ("BTC-USD", "ETH-USD", "SOL-USD", "LUNA-USD")
    assert resolve(["????-USD"], [*listing, row("DOGE-USD")]) == ("DOGE-USD",)
    with pytest.raises(ValueError, match=r"\*-GBP matches no product"):
        resolve(["*-GBP"], listing)
    with pytest.raises(ValueError, match="comes to 3 products; at most 2"):
        resolve(["*-USD"], listing, limit=2)


class ScriptedRest:
    """``GET /products`` as a script: each call takes the next answer (a listing, or an error raised)."""

    def __init__(self, *answers: list[ProductRow] | CoinbaseRestError) -> None:
        self.answers = list(answers)
        self.attempts: list[int | None] = []

    async def products(self, *, attempts: int | None = None) -> list[ProductRow]:
        self.attempts.append(attempts)
        answer = self.answers.pop(0)
        if isinstance(answer, CoinbaseRestError):
            raise answer
        return answer

    def as_rest(self) -> CoinbaseRest:
        return cast(CoinbaseRest, self)


class Stop(Exception):
    """Ends a loop that would otherwise run for ever."""


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every asyncio.sleep the code under test asks for, none of them waited; the sixth ends the test."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        if len(asked) > 5:
            raise Stop

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return asked


DOWN = CoinbaseRestError("GET /products: 503 Service Unavailable")


async def test_settings_without_patterns_are_used_as_they_are() -> None:
    settings = load_settings(products="BTC-USD,ETH-USD")
    rest = ScriptedRest()
    assert await resolve_settings(settings, rest.as_rest()) is settings
    assert rest.attempts == []  # Coinbase not asked


async def test_patterns_wait_for_coinbase_with_growing_back_off_and_say_so(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    # Full jitter drawn a third of the way up: the waits are a third of 0.5 s, 1 s, 2 s (base 0.25 s · 2^n).
    monkeypatch.setattr("appliance.coinbase.backoff.random.uniform", lambda low, high: low + (high - low) / 3)
    settings = load_settings(products="*-USD,BTC-*", reconnect_max_s=30)
    rest = ScriptedRest(DOWN, DOWN, DOWN, [row("ETH-USD"), row("BTC-USD"), row("BTC-EUR")])
    with caplog.at_level(logging.INFO, logger="appliance.products"):
        resolved = await resolve_settings(settings, rest.as_rest())
    assert resolved.products == ("BTC-USD", "ETH-USD", "BTC-EUR")
    assert settings.products == ("*-USD", "BTC-*")  # a copy: the original is not changed
    assert sleeps == pytest.approx([0.5 / 3, 1 / 3, 2 / 3])
    assert rest.attempts == [1, 1, 1, 1]  # one request a try: each wait is this loop's, and logged
    waits = [r for r in caplog.records if r.getMessage() == "product patterns wait for Coinbase"]
    assert [(r.patterns, r.retry_in_s, r.error) for r in waits] == [  # type: ignore[attr-defined]
        ("*-USD,BTC-*", 0.17, str(DOWN)), ("*-USD,BTC-*", 0.33, str(DOWN)), ("*-USD,BTC-*", 0.67, str(DOWN))
    ]  # fmt: skip
    (done,) = [r for r in caplog.records if r.getMessage() == "products resolved"]
    assert (done.count, done.products) == (3, "BTC-USD,ETH-USD,BTC-EUR")  # type: ignore[attr-defined]


LISTING = [row("BTC-USD"), row("ETH-USD", trading_disabled=True), row("LUNA-USD", "delisted"),
           row("OFF-USD", "offline")]  # fmt: skip


def watch_of(rest: ScriptedRest, health: Conditions | None = None) -> tuple[ProductWatch, list[list[str]]]:
    followed: list[list[str]] = []
    products = ["BTC-USD", "ETH-USD", "LUNA-USD", "NOPE-USD", "OFF-USD"]
    return ProductWatch(rest.as_rest(), products, followed.append, health), followed


async def test_a_check_names_each_product_left_out_and_follows_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delisted = row("LUNA-USD", "delisted").model_copy(update={"status_message": "Delisted on 2022-05-13"})
    back = [row("BTC-USD"), row("ETH-USD"), row("LUNA-USD"), row("NOPE-USD"), row("OFF-USD", "offline")]
    rest = ScriptedRest([*LISTING[:2], delisted, LISTING[3]], back)
    health = Conditions()
    watch, followed = watch_of(rest, health)
    with caplog.at_level(logging.INFO, logger="appliance.products"):
        assert await watch.check(attempts=1) is True
    assert rest.attempts == [1]
    assert followed == [["BTC-USD", "ETH-USD", "OFF-USD"]]  # halted and offline stay subscribed
    problems = {(p.component, p.subject): p for p in health.current()}
    assert set(problems) == {("product", "LUNA-USD"), ("product", "NOPE-USD")}
    assert problems["product", "LUNA-USD"].detail == {
        "status": "delisted", "status_message": "Delisted on 2022-05-13"
    }  # fmt: skip
    assert problems["product", "NOPE-USD"].detail == {}  # not listed: no status to give
    (checked,) = [r for r in caplog.records if r.getMessage() == "products checked"]
    assert (checked.following, checked.left_out) == (3, "LUNA-USD,NOPE-USD")  # type: ignore[attr-defined]
    # What Coinbase says halts each product, as of this check.
    assert watch.halted_by("ETH-USD") == ("trading_disabled",)
    assert watch.halted_by("OFF-USD") == ("status offline",)
    assert watch.halted_by("BTC-USD") == ()
    assert watch.halted_by("NOPE-USD") == ()  # not listed: nothing to say
    # Listed again: the problems clear and all five are followed.
    assert await watch.check() is True
    assert health.current() == []
    assert followed[-1] == ["BTC-USD", "ETH-USD", "LUNA-USD", "NOPE-USD", "OFF-USD"]
    assert watch.halted_by("ETH-USD") == ()


async def test_a_check_that_cannot_ask_coinbase_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    rest = ScriptedRest(LISTING, DOWN)
    health = Conditions()
    watch, followed = watch_of(rest, health)
    await watch.check()
    before = health.current()
    with caplog.at_level(logging.INFO, logger="appliance.products"):
        assert await watch.check() is False
    assert (followed, health.current()) == ([["BTC-USD", "ETH-USD", "OFF-USD"]], before)
    assert watch.halted_by("ETH-USD") == ("trading_disabled",)  # the last listing still stands
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("product check failed")]
    assert (failed.error, failed.retry_in_s) == (str(DOWN), 300.0)  # type: ignore[attr-defined]


async def test_a_watch_without_a_health_of_its_own_keeps_one() -> None:
    watch, _ = watch_of(ScriptedRest(LISTING))
    assert await watch.check() is True
    assert {p.subject for p in watch.health.current()} == {"LUNA-USD", "NOPE-USD"}


@pytest.mark.parametrize(
    ("checked_at_start", "waits"),
    # A day is 86,400 s; after a check that failed, the next comes in five minutes (300 s).
    [(True, [86_400.0, 300.0, 300.0, 86_400.0, 86_400.0, 86_400.0]),
     (False, [300.0, 300.0, 300.0, 86_400.0, 86_400.0, 86_400.0])],
)  # fmt: skip
async def test_the_watch_checks_daily_and_sooner_after_a_failure(
    sleeps: list[float], checked_at_start: bool, waits: list[float]
) -> None:
    rest = ScriptedRest(*([LISTING] if checked_at_start else [DOWN]), DOWN, DOWN, LISTING, LISTING, LISTING)
    watch, followed = watch_of(rest)
    assert await watch.check() is checked_at_start
    with pytest.raises(Stop):
        await watch.run()
    assert sleeps == waits
    assert len(followed) == 3 + checked_at_start  # each check that got an answer told the feed


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
