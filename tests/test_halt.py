"""A halted product in the running appliance: said in /health, predictions stale, no repair loop."""

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LIVE_MARKET_ARGS, Broker, running_up

#: ETH-USD stops trading for twelve market hours (24 s here), seven and a half hours in; BTC-USD goes on.
HALTED = [*LIVE_MARKET_ARGS, "--halt", "ETH-USD=2026-04-20T08:00:00Z,2026-04-20T20:00:00Z"]


def halt_problem(url: str) -> dict[str, object] | None:
    problems = httpx.get(f"{url}/health", timeout=5).json()["problems"]
    return next((p for p in problems if p["component"] == "trading" and p["subject"] == "ETH-USD"), None)


def rest_trade_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(v)
        for v in re.findall(r'^cryptopi_rest_requests_total\{endpoint="trades".*\} (\S+)$', text, re.M)
    )


def wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture
def halted_appliance(tmp_path: Path, broker: Broker) -> Iterator[str]:
    with running_up(tmp_path, broker, HALTED) as (url, _):
        yield url


def test_a_halt_is_shown_predictions_say_stale_and_nothing_is_chased(
    halted_appliance: str, tmp_path: Path
) -> None:
    url, log = halted_appliance, tmp_path / "up.log"
    wait(lambda: halt_problem(url) is not None, 90, "the halt to show in /health", log)
    problem = halt_problem(url)
    assert problem is not None
    assert str(problem["message"]).startswith(
        "trading halted since 2026-04-20T07:"
    )  # the last trade before it
    assert problem["detail"]["last_trade_id"]  # type: ignore[index]
    eth = httpx.get(f"{url}/api/predict", params={"product": "ETH-USD"}).json()
    assert eth["stale"] == problem["message"]
    assert httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}).json()["stale"] is None
    assert all(p["stale"] == problem["message"] for p in httpx.get(f"{url}/api/predictions/ETH-USD").json())
    assert httpx.get(f"{url}/health").json()["status"] == "degraded"

    # Heartbeats go on, their last_trade_id unchanged: nothing to repair, so REST is not asked.
    asked = rest_trade_requests(url)
    time.sleep(4)  # two market hours of the halt
    assert halt_problem(url) is not None
    assert rest_trade_requests(url) == asked
    assert "trade gap" not in "".join(line for line in log.read_text().splitlines() if "ETH-USD" in line)

    wait(lambda: halt_problem(url) is None, 90, "trading to resume", log)  # the first trade after clears it
    assert httpx.get(f"{url}/api/predict", params={"product": "ETH-USD"}).json()["stale"] is None
