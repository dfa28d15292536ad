"""``make demo`` run for real: a bad setting stops it at once (exit 2), a second demo is refused with one
line and leaves the first alone, and Ctrl-C (SIGINT to its process group, as a terminal sends it) ends
it quietly with nothing left running."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

#: What an outer ``make test`` passes to the makes it runs: a user's ``make demo`` starts without them.
OUTER_MAKE = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")


def demo(out: Path, demo_port: int, http_port: int, data: Path, **env: str) -> subprocess.Popen[bytes]:
    """``make demo`` in its own session (a terminal's foreground group), loopback only, as a user runs it."""
    user = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE}
    return subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"DEMO_PORT={demo_port}"],
        cwd=REPO, stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env=user | {"CRYPTOPI_HTTP_HOST": "127.0.0.1", "CRYPTOPI_HTTP_PORT": str(http_port),
                    "CRYPTOPI_DATA_DIR": str(data)} | env,
    )  # fmt: skip


def free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "setting",
    [{"CRYPTOPI_PRODUCTS": "btc-usd"}, {"CRYPTOPI_HTTP_PORT": "abc"}, {"CRYPTOPI_MQTT_URL": "http://x"}],
)
def test_a_bad_setting_stops_the_demo_at_once(tmp_path: Path, setting: dict[str, str]) -> None:
    demo_port = free_port()
    proc = demo(tmp_path / "out.log", demo_port, free_port(), tmp_path / "data", **setting)
    assert proc.wait(120) == 2, "make's status for a failed recipe: the settings check exited 2"
    out = (tmp_path / "out.log").read_text()
    (variable,) = setting
    assert re.search(rf"^  {variable}: .*\(got ", out, re.MULTILINE), out
    assert "replaying" not in out, "nothing was started"
    assert free(demo_port)
    assert not (tmp_path / "data").exists()


def test_a_second_demo_is_refused_and_ctrl_c_ends_the_first_quietly(tmp_path: Path) -> None:
    demo_port, http_port, data = free_port(), free_port(), tmp_path / "data"
    first = demo(tmp_path / "first.log", demo_port, http_port, data)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the demo predicts from replayed trades and back-filled history
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            try:
                answer = httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}, timeout=2)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        made = httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}).json()["as_of"]

        second = demo(tmp_path / "second.log", demo_port, http_port, data)  # the same store, too
        assert second.wait(120) == 2
        lines = [line for line in (tmp_path / "second.log").read_text().splitlines()
                 if not line.startswith("make: ***")]  # fmt: skip
        assert len(lines) == 1, lines
        assert re.fullmatch(r"error: port \d+ is in use: is another demo.*\?", lines[0])

        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/predict", params={"product": "BTC-USD"}).json()["as_of"] == made:
            assert time.monotonic() < deadline, "the first demo stopped predicting"
            time.sleep(0.3)
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        first.wait(60)
    out = (tmp_path / "first.log").read_text()
    tail = out[out.index("appliance up") :]
    assert "Traceback" not in out, tail[-3000:]
    assert "make: ***" not in out, tail[-3000:]
    assert "appliance stopped" in tail
    assert "stopped by signal" in tail
    with pytest.raises(ProcessLookupError):  # the replay and the appliance are gone with make
        os.killpg(first.pid, 0)
    assert free(demo_port)
    assert free(http_port)
