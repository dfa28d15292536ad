"""End to end: a real market through the Coinbase protocol, every fault on, candles exact."""

from pathlib import Path

import httpx

from appliance.candles import Trade
from appliance.coinbase.rest import CoinbaseRest
from appliance.ingest import Ingester
from appliance.store import Store
from tests.conftest import (
    CAPTURE,
    MONTH_TAPE_ARGS,
    MetricDelta,
    assert_store_matches_tape,
    make_settings,
    replay_process,
    wait_for,
)

PRODUCTS = ("BTC-USD", "ETH-USD")
ALL_FAULTS = [
    "--heartbeat-s",
    "0.2",
    "--drop-every",
    "500",
    "--silence-every",
    "1100",
    "--silence-s",
    "1.5",
    "--omit-rate",
    "0.01",
    "--duplicate-rate",
    "0.01",
    "--malformed-every",
    "97",
    "--fault-seed",
    "7",
]


def caught_up(reader: Store, tape: list[Trade]) -> bool:
    for product in PRODUCTS:
        state = reader.ingest_state(product)
        if state is None or state.last_trade_id != max(t.trade_id for t in tape if t.product == product):
            return False
    return True


async def ingest_replay(
    tmp_path: Path, tape: list[Trade], replay_args: list[str], running, timeout: float
) -> dict[str, int]:
    """Ingest the replay until caught up, check the candles; returns the faults the server injected."""
    with replay_process(replay_args) as port:
        settings = make_settings(tmp_path, port)
        store = Store(settings.db_path)
        reader = Store(settings.db_path, readonly=True)
        async with CoinbaseRest(settings.coinbase_rest_url) as rest:
            task = running(Ingester(settings, store, rest).run())
            await wait_for(lambda: caught_up(reader, tape), timeout, "the ingester to reach the tape's end")
            task.cancel()
            async with httpx.AsyncClient() as http:
                status = (await http.get(f"{settings.coinbase_rest_url}/replay/status")).json()
    assert_store_matches_tape(reader, tape, PRODUCTS)
    assert reader.integrity_check() == "ok"
    injected: dict[str, int] = status["injected"]
    return injected


async def test_month_of_real_candles_through_every_fault(tmp_path: Path, month_tape, running) -> None:
    assert len(month_tape) >= 10_000
    grown = MetricDelta()
    args = [
        *MONTH_TAPE_ARGS,
        "--speed",
        "0",
        *ALL_FAULTS,
    ]
    injected = await ingest_replay(tmp_path, month_tape, args, running, timeout=240)

    # Every fault really happened, and was survived.
    assert set(injected) == {"omitted", "duplicated", "hostile", "dropped", "silenced"}, injected
    assert grown("cryptopi_feed_disconnects_total", cause="closed") >= injected["dropped"] - 1
    assert grown("cryptopi_feed_disconnects_total", cause="silent") >= 1  # the watchdog re-dialled
    assert grown("cryptopi_feed_rejected_total", reason="malformed") >= 50
    assert grown("cryptopi_feed_rejected_total", reason="duplicate") >= 50
    assert grown("cryptopi_gaps_repaired_total", product="BTC-USD") >= 20
    assert grown("cryptopi_trades_ingested_total", product="BTC-USD", via="rest") >= 50


async def test_real_captured_trades_through_every_fault(tmp_path: Path, capture_tape, running) -> None:
    args = [
        "--capture",
        str(CAPTURE),
        "--speed",
        "0",
        *ALL_FAULTS[:2],
        "--drop-every",
        "60",
        "--omit-rate",
        "0.05",
        "--duplicate-rate",
        "0.05",
        "--malformed-every",
        "13",
    ]
    injected = await ingest_replay(tmp_path, capture_tape, args, running, timeout=60)
    assert set(injected) == {"omitted", "duplicated", "hostile", "dropped"}, injected
