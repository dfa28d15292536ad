"""End to end: a real market through the Coinbase protocol, every fault on, candles exact."""

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.candles import US, Trade, parse_time
from appliance.coinbase.rest import CoinbaseRest
from appliance.health import Conditions
from appliance.ingest import Ingester
from appliance.replay.tape import Halt, apply_halts
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


#: What Coinbase does beyond the happy path (issue #17), all at once: a delisted product listed, a
#: halt of two days, REST lagging the feed by a second, answering 5xx and Cloudflare pages and
#: stalling past the client's timeout, slow consumers dropped, the feed compressed.
ETH_HALT = Halt("ETH-USD", parse_time("2025-09-10") * US, parse_time("2025-09-12") * US)
COINBASE_BEHAVIOUR = ["--list", "OLD-USD=delisted", "--halt", "ETH-USD=2025-09-10,2025-09-12",
                      "--rest-lag-s", "1", "--rest-error-rate", "0.1", "--rest-stall-rate", "0.05",
                      "--rest-stall-s", "2.5", "--slow-consumer-s", "2", "--deflate"]  # fmt: skip


def caught_up(reader: Store, tape: list[Trade]) -> bool:
    for product in {t.product for t in tape}:
        state = reader.ingest_state(product)
        if state is None or state.last_trade_id != max(t.trade_id for t in tape if t.product == product):
            return False
    return True


async def ingest_replay(
    tmp_path: Path, tape: list[Trade], replay_args: list[str], running, timeout: float, **settings: Any
) -> tuple[dict[str, Any], Conditions]:
    """Ingest the replay until caught up, check the candles; returns the replay's status and health."""
    health = Conditions()
    with replay_process(replay_args) as port:
        config = make_settings(tmp_path, port, **settings)
        store = Store(config.db_path)
        reader = Store(config.db_path, readonly=True)
        async with CoinbaseRest.from_settings(config, health) as rest:
            task = running(Ingester(config, store, rest, health=health).run())
            await wait_for(lambda: caught_up(reader, tape), timeout, "the ingester to reach the tape's end")
            task.cancel()
            async with httpx.AsyncClient() as http:
                status = (await http.get(f"{config.coinbase_rest_url}/replay/status")).json()
    assert_store_matches_tape(reader, tape, sorted({t.product for t in tape}))
    assert reader.integrity_check() == "ok"
    return status, health


async def test_month_of_real_candles_through_every_fault(tmp_path: Path, month_tape, running) -> None:
    assert len(month_tape) >= 10_000
    grown = MetricDelta()
    args = [
        *MONTH_TAPE_ARGS,
        "--speed",
        "0",
        *ALL_FAULTS,
    ]
    injected = (await ingest_replay(tmp_path, month_tape, args, running, timeout=240))[0]["injected"]

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
    injected = (await ingest_replay(tmp_path, capture_tape, args, running, timeout=60))[0]["injected"]
    assert set(injected) == {"omitted", "duplicated", "hostile", "dropped"}, injected


@pytest.mark.parametrize("refusal", ["keep-open", "close"])
async def test_a_month_through_everything_coinbase_does(
    tmp_path: Path, month_tape, running, refusal: str
) -> None:
    """Issue #17's behaviours and every fault at once: the candles of each valid product equal the tape.

    Among the products asked for, one Coinbase does not have and one it lists as delisted: left out,
    named in health, never silencing the others (the start check or, if REST fails it, the feed's
    refusal, with the socket kept or closed).
    """
    served = apply_halts(month_tape, [ETH_HALT])  # a halt: no trades for two days, ids close up
    args = [*MONTH_TAPE_ARGS, "--speed", "0", *ALL_FAULTS, *COINBASE_BEHAVIOUR, "--subscribe-error", refusal]
    status, health = await ingest_replay(tmp_path, served, args, running, timeout=280, rest_timeout_s=1.5,
                                         products=("BTC-USD", "NOPE-USD", "ETH-USD", "OLD-USD"))  # fmt: skip
    injected = status["injected"]
    for fault in ("omitted", "duplicated", "hostile", "dropped", "silenced", "rest_5xx", "rest_html",
                  "rest_stalled"):  # fmt: skip
        assert injected.get(fault), (fault, injected)
    assert injected.get("slow_consumer", 0) == 0  # reading never waited for a repair
    assert status["deflated_connections"] >= 1
    for product in ("NOPE-USD", "OLD-USD"):
        problem = health.of("product", product)
        assert problem is not None, health.current()
        assert "left out of the feed" in problem.message
    assert health.of("trading", "ETH-USD") is None  # traded again after the halt (detection: test_halt)


async def test_a_full_buffer_is_said_and_re_synced_over_rest(
    tmp_path: Path, month_tape, running, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight messages of room while REST lags a second behind a market at full speed: ingest drops
    what does not fit, says so, and fetches it from REST; nothing is lost, the connection stays."""
    grown = MetricDelta()
    args = [*MONTH_TAPE_ARGS, "--speed", "0", "--heartbeat-s", "0.2", "--omit-rate", "0.01",
            "--rest-lag-s", "1", "--slow-consumer-s", "2", "--fault-seed", "5"]  # fmt: skip
    status, _ = await ingest_replay(tmp_path, month_tape, args, running, timeout=240, feed_buffer_frames=8)
    assert grown("cryptopi_feed_rejected_total", reason="buffer_full") > 0
    assert grown("cryptopi_trades_ingested_total", product="BTC-USD", via="rest") > 0
    assert status["injected"].get("slow_consumer", 0) == 0
    said = {
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "appliance.health"
    }
    assert said & {"too many trades wait for a gap repair: re-syncing over REST",
                   "ingest fell behind the feed: messages dropped, re-synced over REST"}, said  # fmt: skip
