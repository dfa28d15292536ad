"""A real Home Assistant for the MQTT discovery tests: 2024.3.3, in its own virtualenv, on loopback.

2024.3.3 is the newest release that installs on Python 3.11 (2024.4 needs 3.12). Its virtualenv is
built once per machine under ``CACHE`` (a file lock keeps parallel sessions from racing; a clean CI
machine builds it once per run): Home Assistant with ``josepy<2`` (josepy 2 dropped ``ComparableX509``,
which hass-nabucasa imports, and every HTTP request would answer 500), then the requirements of every
integration that loads at start, MQTT's paho-mqtt 1.6.1 among them, pinned by Home Assistant's own
``package_constraints.txt``. Home Assistant then never installs anything at run time: it runs with pip
unable to reach any index, so an attempt fails loudly (``Unable to install package``), and the fixture
stops at once with that line rather than tolerating it.

Nothing reaches the internet: the configuration names its location and currency (no detection), the
onboarding skips its ``core_config`` step (which would add met.no), and only the integrations that load
by default, plus MQTT, are set up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests import conftest
from tests.dockerenv import CACHE

VERSION = "2024.3.3"
PINS = ("josepy<2",)
#: What configuration.yaml sets up, besides the integrations Home Assistant always loads.
CONFIGURED = ("http", "api", "config", "onboarding", "websocket_api", "logger", "mqtt")
#: Home Assistant's own lists of what loads at start (an MQTT entry sets up every MQTT platform), and
#: the requirements of the default login's MFA.
_START_SET = """
import json
from homeassistant import bootstrap, requirements
from homeassistant.auth.mfa_modules import notify, totp
from homeassistant.components.mqtt.const import PLATFORMS
print(json.dumps({
    "domains": sorted(bootstrap.CORE_INTEGRATIONS | bootstrap.DEFAULT_INTEGRATIONS | set(PLATFORMS)),
    "discovery": {k: list(v) for k, v in requirements.DISCOVERY_INTEGRATIONS.items()},
    "auth": sorted(set(totp.REQUIREMENTS) | set(notify.REQUIREMENTS)),
}))
"""
#: Validates discovery payloads with Home Assistant's own MQTT schemas; says which keys it drops.
_CHECK = """
import json, sys
import voluptuous as vol
from homeassistant.components.mqtt import binary_sensor, sensor
schemas = {"sensor": sensor.DISCOVERY_SCHEMA, "binary_sensor": binary_sensor.DISCOVERY_SCHEMA}
out = []
for component, payload in json.load(sys.stdin):
    try:
        valid = schemas[component](json.loads(json.dumps(payload)))
    except vol.Invalid as exc:
        out.append({"error": str(exc)})
        continue
    dropped = sorted(set(payload) - set(valid))
    dropped += sorted(f"device.{k}" for k in set(payload.get("device", {})) - set(valid.get("device", {})))
    out.append({"dropped": dropped})
print(json.dumps(out))
"""
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (?P<level>[A-Z]+) \((?P<thread>[^)]*)\) "
                        r"\[(?P<logger>[^\]]+)\] (?P<message>.*)")  # fmt: skip
CLIENT_ID = "http://127.0.0.1/"


class HomeAssistantError(RuntimeError):
    """Home Assistant did not install, start or answer; the message carries its log."""


def _run(args: Sequence[str | Path], what: str, stdin: str = "", timeout: float = 1800) -> str:
    """Run a command to its end; its stdout, or HomeAssistantError with its output."""
    proc = subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise HomeAssistantError(f"{what} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def start_requirements(venv: Path, configured: Sequence[str] = CONFIGURED) -> list[str]:
    """Every requirement Home Assistant would install at its first start, as its loader finds them.

    The loader (``homeassistant/requirements.py``) follows each integration's dependencies and
    after-dependencies, and the discovery integrations its manifest names; the default login adds TOTP's.
    """
    python = venv / "bin" / "python"
    start = json.loads(_run([python, "-c", _START_SET], "reading Home Assistant's start set"))
    site = site_packages(venv) / "homeassistant"
    todo, seen, found = [*start["domains"], *configured], set(), set(start["auth"])
    while todo:
        domain = todo.pop()
        if domain in seen:
            continue
        seen.add(domain)
        manifest = json.loads((site / "components" / domain / "manifest.json").read_text())
        found.update(manifest.get("requirements", []))
        todo += manifest.get("dependencies", []) + manifest.get("after_dependencies", [])
        todo += [d for d, keys in start["discovery"].items() if any(k in manifest for k in keys)]
    return sorted(found)


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def ha_venv() -> Path:
    """Home Assistant's virtualenv, built on first use (3.5 min of CPU, 675 MB) and kept under ``CACHE``."""
    recipe = json.dumps([VERSION, PINS, CONFIGURED, sys.version_info[:2], _START_SET]).encode()
    venv = CACHE / f"homeassistant-{VERSION}-{hashlib.sha256(recipe).hexdigest()[:12]}"
    done = venv / ".complete"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".homeassistant.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same one
        if done.is_file():
            return venv
        for old in CACHE.glob("homeassistant-*"):
            shutil.rmtree(old)  # a half-built venv, or one of an older recipe
        started = time.monotonic()
        print(f"\nbuilding Home Assistant {VERSION} in {venv} (once per machine: minutes)", flush=True)
        _run([sys.executable, "-m", "venv", venv], "python -m venv (Debian: apt-get install python3-venv)")
        pip: list[str | Path] = [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]
        _run([*pip, f"homeassistant=={VERSION}", *PINS], f"pip install homeassistant=={VERSION}")
        requirements = start_requirements(venv)
        constraints = site_packages(venv) / "homeassistant" / "package_constraints.txt"
        _run([*pip, "--constraint", constraints, *requirements, *PINS], "pip install (start requirements)")
        done.write_text(
            json.dumps({"seconds": round(time.monotonic() - started, 1), "requirements": requirements})
        )
        print(f"Home Assistant {VERSION} built in {time.monotonic() - started:.0f}s", flush=True)
    return venv


def check_discovery(venv: Path, payloads: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each (component, payload) through Home Assistant's own discovery schema: its error, or keys dropped."""
    out = _run([venv / "bin" / "python", "-c", _CHECK], "the discovery schema check", json.dumps(payloads))
    return list(json.loads(out))


@dataclasses.dataclass(frozen=True)
class LogRecord:
    level: str
    logger: str
    message: str  # with its continuation lines (tracebacks, pip's output)


class HomeAssistant:
    """One Home Assistant process: onboarded, with the MQTT integration on ``broker``."""

    def __init__(self, venv: Path, folder: Path, broker: conftest.Broker) -> None:
        self.venv, self.config, self.broker = venv, folder, broker
        self.port = conftest.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "home-assistant.log"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process ------------------------------------------------------------------------------------

    def start(self, timeout: float = 240) -> float:
        """Start ``hass`` and wait until its API answers; the seconds that took."""
        self.config.mkdir(parents=True, exist_ok=True)
        (self.config / "configuration.yaml").write_text(
            "homeassistant:\n  name: cryptopi test\n  latitude: 0\n  longitude: 0\n  elevation: 0\n"
            "  unit_system: metric\n  time_zone: UTC\n  currency: USD\n  country: US\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            + "".join(f"{domain}:\n" for domain in CONFIGURED if domain not in ("http", "logger", "mqtt"))
            + "logger:\n  default: info\n"
        )
        # pip may reach no index and no local wheels: an install attempt fails and shows in the log.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
        env |= {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [self.venv / "bin" / "hass", "-c", self.config, "--log-no-color"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.config / "hass.stderr").open("ab"),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            self._fail_if_broken()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/api/onboarding", timeout=2).status_code in (200, 401):
                    return time.monotonic() - started
            if time.monotonic() > deadline:
                raise HomeAssistantError(f"Home Assistant did not answer in {timeout}s:\n{self._tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            conftest.stop(self.proc, 60)

    def _tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        stderr = self.config / "hass.stderr"
        return "\n".join(
            (text + (stderr.read_text(errors="replace") if stderr.is_file() else "")).splitlines()[-60:]
        )

    def _fail_if_broken(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HomeAssistantError(f"hass exited {self.proc.returncode}:\n{self._tail()}")
        installs = [r.message for r in self.log() if "Unable to install package" in r.message]
        if installs:
            raise HomeAssistantError("Home Assistant tried to install a package at run time (add it to the "
                                     "venv's start requirements):\n" + installs[0])  # fmt: skip

    # -- setup --------------------------------------------------------------------------------------

    def onboard(self) -> None:
        """Owner account, token, analytics (off) and the integration step; then a long-lived token."""
        user = {"client_id": CLIENT_ID, "name": "Test", "username": "test", "password": "cryptopi-test",
                "language": "en"}  # fmt: skip
        code = self._check(httpx.post(f"{self.url}/api/onboarding/users", json=user, timeout=30))["auth_code"]
        tokens = self._check(httpx.post(f"{self.url}/auth/token", timeout=30, data={
            "grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID}))  # fmt: skip
        self.token = tokens["access_token"]
        self.post("/api/onboarding/analytics", {})
        self.post("/api/onboarding/integration", {"client_id": CLIENT_ID, "redirect_uri": CLIENT_ID})
        self.token = self.ws("auth/long_lived_access_token", client_name="cryptopi tests", lifespan=30)

    def add_mqtt(self) -> Any:
        """The MQTT integration's config flow, pointed at the suite's Mosquitto."""
        flow = self.post("/api/config/config_entries/flow", {"handler": "mqtt"})
        entry = self.post(f"/api/config/config_entries/flow/{flow['flow_id']}",
                          {"broker": "127.0.0.1", "port": self.broker.port})  # fmt: skip
        if entry.get("type") != "create_entry":
            raise HomeAssistantError(f"MQTT config flow did not finish: {entry}")
        return entry

    # -- reading ------------------------------------------------------------------------------------

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            request = f"{response.request.method} {response.request.url.path}"
            raise HomeAssistantError(
                f"{request} answered {response.status_code}: {response.text[:500]}\n{self._tail()}"
            )
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        return self._check(httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30))

    def states(self) -> dict[str, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.token}"}
        return {s["entity_id"]: s for s in self._check(httpx.get(f"{self.url}/api/states", headers=headers,
                                                                  timeout=30))}  # fmt: skip

    def ws(self, command: str, **fields: Any) -> Any:
        """One websocket API command (``config/device_registry/list``, …); its result."""
        with ws_connect(f"ws://127.0.0.1:{self.port}/api/websocket", open_timeout=30) as ws:
            assert json.loads(ws.recv(30))["type"] == "auth_required"
            ws.send(json.dumps({"type": "auth", "access_token": self.token}))
            if (auth := json.loads(ws.recv(30)))["type"] != "auth_ok":
                raise HomeAssistantError(f"websocket auth refused: {auth}")
            ws.send(json.dumps({"id": 1, "type": command, **fields}))
            while (answer := json.loads(ws.recv(30))).get("id") != 1:
                pass
        if not answer.get("success"):
            raise HomeAssistantError(f"{command} failed: {answer}")
        return answer["result"]

    def log(self) -> list[LogRecord]:
        """Home Assistant's log as records (levels INFO and up, as configured)."""
        records: list[LogRecord] = []
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        for line in text.splitlines():
            if match := LOG_RECORD.match(line):
                records.append(LogRecord(match["level"], match["logger"], match["message"]))
            elif records:
                last = records[-1]
                records[-1] = dataclasses.replace(last, message=f"{last.message}\n{line}")
        return records

    def problems(self) -> list[LogRecord]:
        return [r for r in self.log() if r.level in ("WARNING", "ERROR", "CRITICAL")]


@pytest.fixture(scope="session")
def home_assistant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeAssistant]:
    """A real Home Assistant, onboarded, with MQTT on its own Mosquitto (``.broker``), for the session."""
    folder = tmp_path_factory.mktemp("homeassistant")
    started = time.monotonic()
    venv = ha_venv()
    venv_s = time.monotonic() - started
    broker = conftest.Broker(folder)
    broker.start()
    ha = HomeAssistant(venv, folder / "config", broker)
    try:
        start_s = ha.start()
        ha.onboard()
        ha.add_mqtt()
        ready_s = time.monotonic() - started - venv_s
        print(f"\nHome Assistant {VERSION}: venv ready in {venv_s:.1f}s; started in {start_s:.1f}s, "
              f"onboarded with MQTT {ready_s:.1f}s after start")  # fmt: skip
        yield ha
    finally:
        ha.stop()
        broker.stop()
