"""Fifty products and an imperfect Coinbase: what they cost and how fast ingest copes (issue #17 / #12).

Measured in one run, all against the replay server:

* the real ``python -m appliance ingest`` following 50 products on one connection: its CPU share at
  a live-like load (1 heartbeat a second per product, real hourly candles replayed at 3600x, so
  several hundred trades a second in all), and its throughput at full speed;
* a refused subscription (a product Coinbase lacks among three): connect -> first trade of a valid
  product, for each way Coinbase may refuse, beside no refusal;
* REST shared by products: fifty 2-page gap repairs arriving while one product back-fills 60
  requests of candles, at Coinbase's 10 requests/s, with the round-robin limiter and with all
  requests in one FIFO (the same limiter, one key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.candles import HOUR, Trade
from appliance.coinbase.feed import CoinbaseFeed
from appliance.coinbase.messages import MatchMessage
from appliance.coinbase.rest import CoinbaseRest
from appliance.replay.server import Faults, ReplayServer
from appliance.replay.tape import load_tape
from appliance.store import Store
from tests.conftest import BTC_1H, CAPTURE, ETH_1H, REPO, SEPT_2025, replay_process

PRODUCTS = [f"P{i:02d}-USD" for i in range(1, 51)]
DAYS = 3
CANDLES = [arg for i, p in enumerate(PRODUCTS) for arg in ("--candles", f"{p}={BTC_1H if i % 2 else ETH_1H}")]
WINDOW = ["--from", "2025-09-01", "--to", "2025-09-04"]
TARGETS = {"ingest_50_live_cpu_percent": 25.0, "refused_first_trade_s": 2.0}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _held(db: Path) -> int:
    """Trades the store holds, over all products."""
    try:
        with Store(db, readonly=True) as store:
            states = [s for p in PRODUCTS if (s := store.ingest_state(p))]
    except Exception:  # not created or migrated yet
        return 0
    return sum(s.last_trade_id - s.first_trade_id + 1 for s in states)


def ingest_fifty(speed: str, seconds: float, total: int) -> dict[str, float]:
    """CPU and trades of the ingest process: over ``seconds`` after a warm-up, or (speed 0) from its
    first commit until it holds all ``total`` trades of the tape."""
    replay = [*CANDLES, *WINDOW, "--speed", speed, "--heartbeat-s", "1", "--rest-rate-limit", "0"]
    with replay_process(replay) as port, tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"CRYPTOPI_DATA_DIR": tmp, "CRYPTOPI_PRODUCTS": "P*-USD",
                            "CRYPTOPI_LOG_LEVEL": "WARNING", "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{port}",
                            "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
        db = Path(tmp) / "cryptopi.sqlite3"
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "ingest"], env=env, cwd=REPO)
        try:
            while _held(db) == 0:  # connected and ingesting
                if proc.poll() is not None:
                    raise RuntimeError(f"ingest exited with {proc.returncode}")
                time.sleep(0.01)
            if speed != "0":
                time.sleep(2)  # past the start's catch-up
            t0, cpu0, held0 = time.monotonic(), _cpu_s(proc.pid), _held(db)
            if speed == "0":
                while _held(db) < total:
                    time.sleep(0.01)
            else:
                time.sleep(seconds)
            t1, cpu1, held1 = time.monotonic(), _cpu_s(proc.pid), _held(db)
        finally:
            proc.terminate()
            proc.wait(10)
    wall = t1 - t0
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "cpu_percent": 100 * (cpu1 - cpu0) / wall,
            "trades": held1 - held0, "trades_per_s": (held1 - held0) / wall,
            "cpu_us_per_trade": 1e6 * (cpu1 - cpu0) / max(1, held1 - held0),
            "heartbeats_per_s": len(PRODUCTS)}  # fmt: skip


async def first_trade_after_refusal(tape: list[Trade], faults: Faults | None, rounds: int = 5) -> float:
    """Median seconds from the first dial to the first trade of a valid product."""
    samples = []
    for _ in range(rounds):
        server = ReplayServer(tape, heartbeat_s=0.5, faults=faults or Faults())
        url = f"ws://127.0.0.1:{await server.start()}"
        products = ["BTC-USD", "NOPE-USD", "ETH-USD"] if faults else ["BTC-USD", "ETH-USD"]
        feed = CoinbaseFeed(url, products, reconnect_max_s=1.0)
        started = time.perf_counter()
        async for event in feed.events():
            if isinstance(event, MatchMessage):
                samples.append(time.perf_counter() - started)
                break
        await server.close()
    return statistics.median(samples)


async def fair_rest(tape: list[Trade], fair: bool) -> dict[str, float]:
    """Fifty 2-page repairs while one product back-fills: how long the repairs wait."""
    server = ReplayServer(
        tape, start_at_us=max(t.time_us for t in tape) + 1, rest_rate_limit=10, rest_burst=15
    )
    port = await server.start()
    async with CoinbaseRest(f"http://127.0.0.1:{port}", rate_per_s=9.5) as rest:
        if not fair:  # every request in one queue: first come, first served
            wait = rest.limiter.wait
            rest.limiter.wait = lambda key="": wait("")  # type: ignore[method-assign]
        start = tape[0].time_us // 1_000_000 // HOUR * HOUR

        async def backfill() -> None:  # 60 candle requests, all asked at once (as a burst of windows)
            await asyncio.gather(*(rest.candles(PRODUCTS[0], HOUR, start, start + HOUR) for _ in range(60)))

        async def repair(product: str) -> float:
            last = server.products[product].trades[-1].trade_id
            began = time.perf_counter()
            await rest.trades_between(product, last - 1500, last)  # two pages
            return time.perf_counter() - began

        filling = asyncio.create_task(backfill())
        await asyncio.sleep(0.5)
        waits = await asyncio.gather(*(repair(p) for p in PRODUCTS[1:]))
        began = time.perf_counter()
        await filling
        backfill_rest = time.perf_counter() - began
    await server.close()
    return {"repair_median_s": statistics.median(waits), "repair_max_s": max(waits),
            "backfill_left_after_repairs_s": backfill_rest}  # fmt: skip


def run(out: Path) -> bool:
    """Measure, write ``out/products.json``, print a summary; True if every target was met."""
    print(f"fifty products: {DAYS} days of real hourly candles each, on one connection", flush=True)
    tape = [t for i, p in enumerate(PRODUCTS) for t in load_tape(candles=[(p, BTC_1H if i % 2 else ETH_1H)],
            start=SEPT_2025[0], end=SEPT_2025[0] + DAYS * 86400)]  # fmt: skip
    total = len(tape)
    live = ingest_fifty("3600", 20, total)
    full = ingest_fifty("0", 0, total)
    capture = load_tape(captures=[CAPTURE])
    logging.disable(logging.WARNING)  # the refusals are meant: their WARNINGs are not news here
    refusal = {
        "none": asyncio.run(first_trade_after_refusal(capture, None)),
        "keep_open": asyncio.run(first_trade_after_refusal(capture, Faults(subscribe_error="keep_open"))),
        "close": asyncio.run(first_trade_after_refusal(capture, Faults(subscribe_error="close"))),
        "unnamed": asyncio.run(first_trade_after_refusal(capture, Faults(refusal_names_product=False))),
    }
    logging.disable(logging.NOTSET)
    fifty = [t for i, p in enumerate(PRODUCTS) for t in load_tape(candles=[(p, BTC_1H if i % 2 else ETH_1H)],
             start=SEPT_2025[0], end=SEPT_2025[0] + 10 * 86400, seed=i)]  # fmt: skip
    rest = {"round_robin": asyncio.run(fair_rest(fifty, True)), "fifo": asyncio.run(fair_rest(fifty, False))}
    measured = {"ingest_50_live_cpu_percent": live["cpu_percent"],
                "refused_first_trade_s": max(refusal.values())}  # fmt: skip
    met = {k: v <= TARGETS[k] for k, v in measured.items()}
    targets = {k: {"target": TARGETS[k], "measured": measured[k], "met": met[k]} for k in TARGETS}
    results = {"ingest_50_live": live, "ingest_50_full_speed": full, "first_trade_s": refusal,
               "rest_sharing": rest, "targets": targets}  # fmt: skip
    out.mkdir(exist_ok=True)
    (out / "products.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"50 products, live-like   {live['cpu_percent']:5.1f} % of a core "
          f"({live['trades_per_s']:,.0f} trades/s + {live['heartbeats_per_s']} heartbeats/s)")  # fmt: skip
    print(f"50 products, full speed  {full['trades_per_s']:,.0f} trades/s, "
          f"{full['cpu_us_per_trade']:.0f} us CPU a trade (ingest at {full['cpu_percent']:.0f} %: "
          "the replay is the limit)")  # fmt: skip
    print("first trade after dialing: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in refusal.items()))
    for mode, r in rest.items():
        print(
            f"REST {mode:<11} 49 repairs amid a back-fill: median {r['repair_median_s']:.1f} s, "
            f"max {r['repair_max_s']:.1f} s; back-fill done {r['backfill_left_after_repairs_s']:.1f} s later"
        )
    for key, value in measured.items():
        print(f"{'ok  ' if met[key] else 'MISS'} {key:<28} {value:8.2f}   target <= {TARGETS[key]}")
    print(f"results: {out / 'products.json'}")
    return all(met.values())
