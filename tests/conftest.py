"""Shared fixtures: real tapes from the bundled Coinbase data, a replay server, and the oracle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client import REGISTRY

from appliance.candle_csv import read_candle_csv
from appliance.candles import TRADE_GRANULARITIES, Candle, Trade, aggregate
from appliance.features import CandleSeries
from appliance.replay.tape import load_tape
from appliance.settings import Settings
from appliance.store import Store

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

#: The private dockerd, registry and base image of the Docker tests, and the real Home Assistant: one of
#: each per session.
pytest_plugins = ["tests.dockerenv", "tests.homeassistant"]

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO / "appliance" / "datasets"
CAPTURE = DATASETS / "coinbase_ws_exchange_feed_2026-07-07_BTC-USD_ETH-USD_matches_heartbeat.jsonl"
RAW_CAPTURE_2026 = DATASETS / "coinbase_ws_exchange_feed_2026-07-07_BTC-USD_ETH-USD_raw.jsonl"
RAW_CAPTURE_2021 = DATASETS / "coinbase_ws_exchange_feed_2021-04-17_raw.jsonl"
ADVANCED_TRADE_CAPTURE = DATASETS / "coinbase_ws_advanced_trade_2026-08-09_no_l2.jsonl"
BTC_1H = DATASETS / "coinbase_BTC-USD_1h.csv"
ETH_1H = DATASETS / "coinbase_ETH-USD_1h.csv"
BTC_1M = DATASETS / "coinbase_BTC-USD_1m.csv"
BTC_15M = DATASETS / "coinbase_BTC-USD_15m.csv"
ETH_15M = DATASETS / "coinbase_ETH-USD_15m.csv"
# 2025-09-01 .. 2025-10-01 (epoch s): a month of both products, ~10k generated trades.
SEPT_2025 = (1756684800, 1759276800)


def stop(proc: subprocess.Popen[Any], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not gone within ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def chromium(pw: Playwright) -> Browser:
    """Debian's Chromium, headless, with none of its own traffic (updates, sync, QUIC)."""
    return pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The replay CLI's arguments that serve exactly the ``month_tape`` fixture.
MONTH_TAPE_ARGS = ["--candles", f"BTC-USD={BTC_1H}", "--candles", f"ETH-USD={ETH_1H}",
                   "--from", "2025-09-01", "--to", "2025-10-01"]  # fmt: skip


#: A live-looking market for the appliance: spring 2026, both products, an hour of market every 2 s,
#: starting mid-hour (so ingest begins with a partial candle, as it does for real).
LIVE_MARKET_ARGS = ["--candles", f"BTC-USD={BTC_1H}", "--candles", f"ETH-USD={ETH_1H}",
                    "--from", "2026-03-20", "--to", "2026-05-01", "--start-at", "2026-04-20T00:30:00Z",
                    "--speed", "1800", "--heartbeat-s", "0.2"]  # fmt: skip


@pytest.fixture(scope="session")
def month_tape() -> list[Trade]:
    """Both products' real hourly candles for September 2025, as trades that rebuild them."""
    return load_tape(candles=[("BTC-USD", BTC_1H), ("ETH-USD", ETH_1H)], start=SEPT_2025[0], end=SEPT_2025[1])


@pytest.fixture(scope="session")
def capture_tape() -> list[Trade]:
    return load_tape(captures=[CAPTURE])


def oracle(trades: Sequence[Trade], product: str, first_trade_id: int, granularity: int) -> dict[int, Candle]:
    """The candles the tape implies from ``first_trade_id`` on, straight from the trades."""
    picked = sorted(
        (t for t in trades if t.product == product and t.trade_id >= first_trade_id), key=lambda t: t.trade_id
    )
    return {start: c for (_, start), c in aggregate(picked, granularity).items()}


def assert_store_matches_tape(store: Store, trades: Sequence[Trade], products: Sequence[str]) -> None:
    for product in products:
        state = store.ingest_state(product)
        assert state is not None, f"{product}: nothing ingested"
        last = max(t.trade_id for t in trades if t.product == product)
        assert state.last_trade_id == last, (
            f"{product}: stopped at {state.last_trade_id}, tape ends at {last}"
        )
        for g in TRADE_GRANULARITIES:
            expected = oracle(trades, product, state.first_trade_id, g)
            got = store.trade_candle_deltas(product, g)
            assert got.keys() == expected.keys(), f"{product} {g}s: buckets differ"
            bad = [s for s in expected if got[s] != expected[s]]
            assert not bad, (
                f"{product} {g}s: {len(bad)} bars differ, first {bad[0]}: {got[bad[0]]} != {expected[bad[0]]}"
            )


def make_settings(tmp_path: Path, port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "products": ("BTC-USD", "ETH-USD"),
        "coinbase_ws_url": f"ws://127.0.0.1:{port}",
        "coinbase_rest_url": f"http://127.0.0.1:{port}",
        "feed_watchdog_s": 1.0,
        "reconnect_max_s": 0.5,
        "commit_interval_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def replay_process(args: Sequence[str]) -> Iterator[int]:
    """``python -m appliance replay`` in its own process (the real CLI); yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "replay", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=os.environ.copy(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not re.search(rf":{port}\b", line):
            proc.kill()
            raise AssertionError(
                f"replay did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        yield port
    finally:
        stop(proc)


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., asyncio.Task[None]]]:
    """Start coroutines as tasks that are cancelled (and awaited) when the test ends."""
    tasks: list[asyncio.Task[None]] = []

    def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks.append(task)
        return task

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class FakeClock:
    """A clock the test sets (``now``); its sleeps return at once, so a waiting deployer looks again."""

    def __init__(self, now: float, synced: bool = True) -> None:
        self.now = now
        self.synced = synced

    def time(self) -> float:
        return self.now

    def synchronized(self) -> bool:
        return self.synced

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0.02)


class MetricDelta:
    """How much each ``cryptopi_*`` sample has grown since construction (counters are process-wide)."""

    def __init__(self) -> None:
        self.before = self._snapshot()

    @staticmethod
    def _snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in REGISTRY.collect()
            for s in family.samples
            if s.name.startswith("cryptopi_")
        }

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._snapshot().get(key, 0.0) - self.before.get(key, 0.0)


@pytest.fixture(scope="session")
def btc_hourly() -> CandleSeries:
    """All real BTC-USD hourly candles (2023-12-31 .. 2026-05-08, two real 5-hour holes)."""
    return CandleSeries.from_rows(3600, [c.row() for c in read_candle_csv(BTC_1H)])


@pytest.fixture(scope="session")
def btc_15m() -> CandleSeries:
    """All real BTC-USD 15-minute candles (2024-04-18 .. 2026-05-08, four real holes)."""
    return CandleSeries.from_rows(900, [c.row() for c in read_candle_csv(BTC_15M, 900)])


class Broker:
    """A real Mosquitto on a loopback port; it can be stopped and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "log_dest stderr\n")  # fmt: skip
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([mosquitto, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"))  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class MqttWatcher:
    """A plain paho subscriber that records every payload per topic (the last one, and a count)."""

    def __init__(self, port: int, topics: Sequence[str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.last: dict[str, bytes] = {}
        self.count: dict[str, int] = {}
        self.history: dict[str, list[bytes]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            self.last[msg.topic] = msg.payload
            self.count[msg.topic] = self.count.get(msg.topic, 0) + 1
            self.history.setdefault(msg.topic, []).append(msg.payload)

        def on_connect(client: Any, *_: Any) -> None:
            for topic in topics:
                client.subscribe(topic, qos=1)

        self.client.on_message = on_message
        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; have {sorted(self.last)}"
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Appliance:
    """``python -m appliance up`` on a data folder, against a replay server, with its log kept.

    It records every answer: ``stop`` checks that none was a 5xx other than 503 ("not yet").
    """

    def __init__(self, data: Path, replay_port: int, log: Path) -> None:
        self.port, self.log = free_port(), log
        env = os.environ | {
            "CRYPTOPI_DATA_DIR": str(data), "CRYPTOPI_HTTP_HOST": "127.0.0.1",
            "CRYPTOPI_HTTP_PORT": str(self.port), "CRYPTOPI_LOG_LEVEL": "INFO",
            "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{replay_port}",
            "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{replay_port}",
            "CRYPTOPI_FEED_WATCHDOG_S": "2", "CRYPTOPI_RECONNECT_MAX_S": "0.5",
            "CRYPTOPI_COMMIT_INTERVAL_S": "1",  # the tape's last trades are stored soon after it ends
        }  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "up"], env=env, cwd=REPO,
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
        self.statuses: list[tuple[str, int]] = []
        self.wait(lambda: self.get("/livez") is not None, 60, "the API to answer")

    def get(self, path: str, **params: Any) -> httpx.Response | None:
        assert self.proc.poll() is None, f"the appliance exited:\n{self.tail()}"
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}{path}", params=params, timeout=5)
        except httpx.TransportError:
            return None
        self.statuses.append((path, answer.status_code))
        return answer

    def status(self, path: str, **params: Any) -> int | None:
        answer = self.get(path, **params)
        return answer.status_code if answer is not None else None

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = self.ok("/health").json()
        return body

    def ok(self, path: str, **params: Any) -> httpx.Response:
        answer = self.get(path, **params)
        assert answer is not None, f"{path}: no answer"
        assert answer.status_code == 200, (path, answer.text)
        return answer

    def storage_problem(self) -> str | None:
        return next((p["message"] for p in self.health()["problems"] if p["component"] == "storage"), None)

    def incidents(self) -> list[str]:
        return [i["message"] for i in self.health()["incidents"] if i["component"] == "storage"]

    def serves(self) -> None:
        """What the API holds is served: candles from the store, the stream's health, never a 5xx."""
        assert self.ok("/api/candles/BTC-USD").json(), "no candles served"
        for path in ("/livez", "/api/predictions/BTC-USD", "/metrics"):
            self.ok(path)

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"the appliance exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.tail()}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.tail()
        errors = [s for s in self.statuses if s[1] >= 500 and s[1] != 503]  # 503: no prediction yet
        assert not errors, errors

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@contextlib.contextmanager
def appliance(data: Path, replay_port: int, log: Path) -> Iterator[Appliance]:
    app = Appliance(data, replay_port, log)
    try:
        yield app
    finally:
        app.kill()


def all_predicting(health: dict[str, Any]) -> bool:
    return all(p["prediction"] == "ok" for p in health["products"].values())


@contextlib.contextmanager
def appliance_up(
    data: Path,
    broker: Broker | None,
    replay_port: int,
    port: int | None = None,
    ready: Callable[[dict[str, Any]], bool] = all_predicting,
    wrapper: Sequence[str] = (),
    **settings: str,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m appliance up`` on a replay server (and Mosquitto), until ``ready(/health)``: by
    default, until every product has a prediction. ``settings`` are more CRYPTOPI_* variables (by field
    name); ``wrapper`` is a command that runs the appliance (``prlimit ...``).

    Its API listens on ``port`` (a free one by default). The log goes on in ``data/up.log`` across
    restarts; whatever is still running is killed at the end.
    """
    port = port or free_port()
    env = os.environ | {
        "CRYPTOPI_DATA_DIR": str(data), "CRYPTOPI_HTTP_HOST": "127.0.0.1",
        "CRYPTOPI_HTTP_PORT": str(port),
        "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{replay_port}",
        "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{replay_port}",
    } | ({"CRYPTOPI_MQTT_URL": broker.url} if broker else {}) | {
        f"CRYPTOPI_{name.upper()}": value for name, value in settings.items()
    }  # fmt: skip
    log = (data / "up.log").open("ab")
    proc = subprocess.Popen([*wrapper, sys.executable, "-m", "appliance", "up"], env=env, cwd=REPO,
                            stdout=log, stderr=log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, (data / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (data / "up.log").read_text()[-3000:]
            try:
                if ready(httpx.get(f"{url}/health", timeout=2).json()):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


@contextlib.contextmanager
def running_up(
    data: Path,
    broker: Broker | None,
    market: Sequence[str] = LIVE_MARKET_ARGS,
    ready: Callable[[dict[str, Any]], bool] = all_predicting,
    wrapper: Sequence[str] = (),
    **settings: str,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Replay server (+ Mosquitto) + ``python -m appliance up``, until ``ready(/health)``."""
    with (
        replay_process(market) as replay_port,
        appliance_up(data, broker, replay_port, None, ready, wrapper, **settings) as up,
    ):
        yield up
