"""Live-rate benchmark: what ``python -m appliance up`` writes to storage and costs in CPU, per day.

A real-time replay (``--speed 1 --at-now``, the market clock on the wall clock's minute) feeds the
real appliance, no MQTT, at a live trade rate: 1 product at ~5 trades/s, 2 products at ~5 trades/s
each, 50 products at ~2 trades/s each (the bundled real BTC-USD minute candles, under several product
ids for load). The three run side by side, each with its own replay; after a warm-up (start,
back-fill), a window of whole minutes is measured from ``/proc/PID/io`` (``write_bytes``: what reaches
the block layer, page cache included) and ``/proc/PID/stat`` (user + system CPU). The window should
be a whole number of hours to weigh the hourly work (the hour's close, predictions, retention) right:
60 minutes by default. The data folders live on the repository's file system: tmpfs would write
nothing to a disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.candles import parse_time
from tests.conftest import BTC_1M, REPO, free_port, replay_process

TARGETS = {"mb_per_day_1_product": 20.0, "cpu_percent_2_products": 2.0, "cpu_percent_50_products": 10.0}
#: A stretch of the minute file to replay: enough past for the models' 25 hours of history.
ANCHOR = "2020-11-24T02:00:00Z"
WARM_UP_S = 120


@dataclass(frozen=True)
class Config:
    name: str
    products: tuple[str, ...]
    trades_per_candle: str  # per minute candle: 300 is 5 trades/s
    history_h: int  # hours of market before the start (what REST back-fills)


CONFIGS = (
    Config("1 product", ("BTC-USD",), "250,350", 26),
    Config("2 products", ("BTC-USD", "ETH-USD"), "250,350", 26),
    # Fewer hours before the start keep the replay's tape small; these products make no predictions
    # (history too short), which costs 0.55 ms a product an hour when they do.
    Config("50 products", tuple(f"P{i:02d}-USD" for i in range(50)), "100,140", 2),
)


def proc_io(pid: int) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", Path(f"/proc/{pid}/io").read_text())}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([\d.e+]+)$", text, re.M))


class Running:
    """One configuration: its replay and its appliance."""

    def __init__(self, config: Config, root: Path, stack: contextlib.ExitStack, minutes: int) -> None:
        self.config = config
        self.data = root / config.name.replace(" ", "-")
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        start_at = parse_time(ANCHOR) + int(time.time()) % 3600 // 60 * 60  # --at-now keeps the minute: live
        args = [f"--candles={p}={BTC_1M}" for p in config.products]
        args += [f"--from={start_at - config.history_h * 3600}", f"--to={start_at + (minutes + 15) * 60}",
                 f"--start-at={start_at}", "--at-now", "--speed=1",
                 f"--trades-per-candle={config.trades_per_candle}"]  # fmt: skip
        replay_port = stack.enter_context(replay_process(args))
        self.port = free_port()
        env = os.environ | {
            "CRYPTOPI_DATA_DIR": str(self.data), "CRYPTOPI_HTTP_HOST": "127.0.0.1",
            "CRYPTOPI_HTTP_PORT": str(self.port), "CRYPTOPI_LOG_LEVEL": "WARNING",
            "CRYPTOPI_PRODUCTS": ",".join(config.products), "CRYPTOPI_HISTORY_DAYS": "2",
            "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{replay_port}",
            "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{replay_port}",
        }  # fmt: skip
        log = (self.data.parent / f"{self.data.name}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "up"], env=env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        stack.callback(self.stop)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=10)

    def wait_up(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.config.name}: the appliance exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if self.get("/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.config.name}: /health did not answer in {timeout_s} s")
            time.sleep(0.5)

    def sample(self) -> dict[str, float]:
        metrics = self.get("/metrics").text
        return {"t": time.monotonic(), "write_bytes": proc_io(self.proc.pid)["write_bytes"],
                "cpu_s": proc_cpu_s(self.proc.pid),
                "trades": metric(metrics, "cryptopi_trades_ingested_total"),
                "commits": metric(metrics, "cryptopi_store_commits_total")}  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def started(root: Path, minutes: int) -> Iterator[list[Running]]:
    with contextlib.ExitStack() as stack:
        runs = [Running(c, root, stack, minutes) for c in CONFIGS]
        for run in runs:
            run.wait_up()
        yield runs


def on_tmpfs(path: Path) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout
    return out.strip() in ("tmpfs", "ramfs")


def run(out: Path, minutes: int) -> bool:
    root = REPO / "bench-results" / "live-data"
    root.mkdir(parents=True, exist_ok=True)
    if on_tmpfs(root):
        print(f"{root} is on tmpfs: write_bytes would measure nothing; run the bench from a disk")
        return False
    print(f"live-rate bench: 3 appliances at a real-time replay, {WARM_UP_S} s warm-up, then {minutes} min",
          flush=True)  # fmt: skip
    results: dict[str, object] = {"window_min": minutes, "warm_up_s": WARM_UP_S}
    with started(root, minutes) as runs:
        time.sleep(WARM_UP_S)
        before = [r.sample() for r in runs]
        time.sleep(minutes * 60)
        after = [r.sample() for r in runs]
        health = [r.get("/health").json() for r in runs]
    figures: dict[str, dict[str, float]] = {}
    for r, a, b, h in zip(runs, before, after, health, strict=True):
        span = b["t"] - a["t"]
        written = b["write_bytes"] - a["write_bytes"]
        figures[r.config.name] = {
            "products": len(r.config.products),
            "trades_per_s": (b["trades"] - a["trades"]) / span,
            "commits_per_hour": (b["commits"] - a["commits"]) * 3600 / span,
            "write_bytes_per_s": written / span,
            "mb_per_day": written / span * 86400 / 1e6,
            "cpu_percent": (b["cpu_s"] - a["cpu_s"]) / span * 100,
            "db_bytes": sum(f.stat().st_size for f in r.data.iterdir()),
        }
        results[r.config.name] = figures[r.config.name] | {
            "status": h["status"], "problems": [p["message"] for p in h["problems"]],
        }  # fmt: skip
    measured = {
        "mb_per_day_1_product": figures["1 product"]["mb_per_day"],
        "cpu_percent_2_products": figures["2 products"]["cpu_percent"],
        "cpu_percent_50_products": figures["50 products"]["cpu_percent"],
    }
    met = {k: v <= TARGETS[k] for k, v in measured.items()}
    results["targets"] = {k: {"target": TARGETS[k], "measured": measured[k], "met": met[k]} for k in TARGETS}
    (out / "live.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, f in figures.items():
        print(f"{name:<12} {f['trades_per_s']:>6.1f} trades/s  {f['mb_per_day']:>7.1f} MB/day written  "
              f"CPU {f['cpu_percent']:.2f} % of a core  {f['commits_per_hour']:.0f} commits/h")  # fmt: skip
    for key, label in [("mb_per_day_1_product", "storage writes, 1 product"),
                       ("cpu_percent_2_products", "CPU, 2 products"),
                       ("cpu_percent_50_products", "CPU, 50 products")]:  # fmt: skip
        print(
            f"{'ok  ' if met[key] else 'MISS'} {label:<27} {measured[key]:>8.2f}   target <= {TARGETS[key]}"
        )
    print(f"results: {out / 'live.json'}")
    return all(met.values())
