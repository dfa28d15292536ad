"""Ingest benchmark: trades/s from the replay server into committed candles, beside parse-only.

Both runs use the same replay server, tape and machine in one invocation: first a client that only
receives and parses the frames, then the real ``python -m appliance ingest`` process, timed from its
first committed trade to its last while its peak RSS is read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

from appliance.coinbase.messages import MatchMessage, parse_feed_frame
from appliance.replay.tape import load_tape
from appliance.store import Store
from tests.conftest import BTC_1M, REPO, replay_process

TARGETS: dict[str, float] = {
    "ingest_trades_per_s": 20_000,
    "ingest_vs_parse_ratio": 0.5,
    "ingest_peak_rss_mb": 100,
}
REPLAY = ["--candles", f"BTC-USD={BTC_1M}", "--speed", "0", "--heartbeat-s", "1", "--rest-rate-limit", "0"]


async def parse_only(url: str, last_id: int) -> dict[str, float]:
    """Receive and parse every frame up to the tape's last trade; nothing else."""
    async with websockets.connect(url, max_size=1 << 20) as ws:
        await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["matches"]}))
        trades, started = 0, 0.0
        while True:
            msg = parse_feed_frame(await ws.recv())
            if isinstance(msg, MatchMessage) and msg.type == "match":
                msg.trade()
                trades += 1
                if trades == 1:
                    started = time.perf_counter()
                if msg.trade_id == last_id:
                    break
    elapsed = time.perf_counter() - started
    return {"trades": trades, "seconds": elapsed, "trades_per_s": (trades - 1) / elapsed}


def ingest(port: int, last_id: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {
            "CRYPTOPI_DATA_DIR": tmp,
            "CRYPTOPI_PRODUCTS": "BTC-USD",
            "CRYPTOPI_LOG_LEVEL": "WARNING",
            "CRYPTOPI_COMMIT_INTERVAL_S": "1",  # the tape's last trades are stored a second after it ends
            "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{port}",
            "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{port}",
        }
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "ingest"], env=env, cwd=REPO)
        db = Path(tmp) / "cryptopi.sqlite3"
        first: tuple[float, int] | None = None
        try:
            while True:
                time.sleep(0.01)
                if proc.poll() is not None:
                    raise RuntimeError(f"ingester exited with {proc.returncode}")
                if not db.exists():
                    continue
                try:
                    with Store(db, readonly=True) as store:
                        state = store.ingest_state("BTC-USD")
                except sqlite3.OperationalError:  # created but not yet migrated
                    continue
                now = time.perf_counter()
                if state is None:
                    continue
                if first is None:
                    first = (now, state.last_trade_id)
                if state.last_trade_id == last_id:
                    break
            rss_kb = _peak_rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    assert first is not None
    trades = last_id - first[1]
    elapsed = now - first[0]
    return {
        "trades": trades,
        "seconds": elapsed,
        "trades_per_s": trades / elapsed,
        "peak_rss_mb": rss_kb / 1024,
    }


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc")


def run(out: Path) -> bool:
    """Measure, write ``out/ingest.json``, print a summary; True if every target was met."""
    tape = load_tape(candles=[("BTC-USD", BTC_1M)])
    last_id = tape[-1].trade_id
    print(f"tape: {len(tape):,} BTC-USD trades rebuilt from {BTC_1M.name}", flush=True)
    with replay_process(REPLAY) as port:
        parsed = asyncio.run(parse_only(f"ws://127.0.0.1:{port}", last_id))
    with replay_process(REPLAY) as port:
        ingested = ingest(port, last_id)
    results: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "tape_trades": len(tape),
        "parse_only": parsed,
        "ingest": ingested,
    }
    measured = {
        "ingest_trades_per_s": ingested["trades_per_s"],
        "ingest_vs_parse_ratio": ingested["trades_per_s"] / parsed["trades_per_s"],
        "ingest_peak_rss_mb": ingested["peak_rss_mb"],
    }
    met = {k: v <= TARGETS[k] if k.endswith("_mb") else v >= TARGETS[k] for k, v in measured.items()}
    results["targets"] = {k: {"target": TARGETS[k], "measured": measured[k], "met": met[k]} for k in TARGETS}
    out.mkdir(exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"parse only  {parsed['trades_per_s']:>9,.0f} trades/s ({parsed['trades']:,} trades parsed)")
    print(
        f"ingest      {ingested['trades_per_s']:>9,.0f} trades/s ({ingested['trades']:,} trades into SQLite)"
    )
    for key, label, fmt, op in [
        ("ingest_trades_per_s", "ingest throughput", "{:,.0f}/s", ">="),
        ("ingest_vs_parse_ratio", "ingest / parse-only", "{:.0%}", ">="),
        ("ingest_peak_rss_mb", "ingester peak RSS", "{:.1f} MB", "<="),
    ]:
        status = "ok  " if met[key] else "MISS"
        print(
            f"{status} {label:<20} {fmt.format(measured[key]):>10}   target {op} {fmt.format(TARGETS[key])}"
        )
    print(f"results: {out / 'ingest.json'}")
    return all(met.values())
