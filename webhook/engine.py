"""The Docker side of a deploy: the docker SDK for images and containers, Compose for the service.

Blocking calls, run in a worker thread by the deployer. The image deployed is the one compose.yaml
names for the service: the receiver never takes an image name from a request.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import docker
from docker.errors import DockerException, NotFound

from webhook.settings import WebhookSettings

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A step failed; the message says which and why."""


class Unhealthy(DeployError):
    """The new container never passed its health check: the image itself is at fault."""


@dataclass(frozen=True)
class ImageInfo:
    id: str
    digest: str | None


def split_reference(reference: str) -> tuple[str, str]:
    """'host:5000/ns/app:v2' -> ('host:5000/ns/app', 'v2'); no tag means 'latest'."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


class Engine:
    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.client = docker.from_env()
        # Compose gets the environment without the webhook's own settings (its token among them).
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTOPI_WEBHOOK_")}

    def image_reference(self) -> str:
        """The service's image as compose resolves it (its env file included)."""
        out = self._compose("config", "--format", "json", self.settings.service)
        try:
            return str(json.loads(out)["services"][self.settings.service]["image"])
        except (KeyError, ValueError) as exc:
            raise DeployError(f"compose config names no image for service {self.settings.service}") from exc

    def pull(self, reference: str) -> ImageInfo:
        repository, tag = split_reference(reference)
        try:
            image = self.client.images.pull(repository, tag=tag)
        except DockerException as exc:
            raise DeployError(f"pull {reference}: {exc}") from exc
        return _info(image.id, image.attrs.get("RepoDigests", []))

    def running(self) -> ImageInfo | None:
        """The image of the service's current container, if there is one."""
        container = self._container()
        if container is None:
            return None
        image_id = container.attrs["Image"]
        try:
            digests = self.client.images.get(image_id).attrs.get("RepoDigests", [])
        except NotFound:
            digests = []
        return _info(image_id, digests)

    def retag(self, image_id: str, reference: str) -> None:
        """Point the reference back at an earlier image: what a rollback recreates from."""
        repository, tag = split_reference(reference)
        if not self.client.images.get(image_id).tag(repository, tag=tag):
            raise DeployError(f"could not tag {image_id} as {reference}")

    def recreate(self) -> None:
        self._compose("up", "--detach", "--no-deps", "--pull", "never", self.settings.service)

    def wait_healthy(self, timeout_s: float) -> None:
        """Until the service's container is healthy; DeployError if it turns unhealthy or time runs out."""
        deadline = time.monotonic() + timeout_s
        status = "no container"
        while time.monotonic() < deadline:
            container = self._container()
            if container is not None:
                state = container.attrs["State"]
                health = state.get("Health")
                if health is None:
                    raise Unhealthy("the image has no HEALTHCHECK: nothing to gate the deploy on")
                status = health["Status"]
                if status == "healthy":
                    return
                if status == "unhealthy":
                    last = (health.get("Log") or [{}])[-1].get("Output", "").strip()
                    raise Unhealthy(f"container unhealthy: {last[-300:]}")
            time.sleep(1)
        raise Unhealthy(f"not healthy within {timeout_s:.0f} s (last status: {status})")

    def _container(self) -> Any:  # docker.models.containers.Container (the SDK has no types)
        labels = [f"com.docker.compose.project={self.settings.compose_project}",
                  f"com.docker.compose.service={self.settings.service}",
                  "com.docker.compose.oneoff=False"]  # not a `compose run` of the same service  # fmt: skip
        found = self.client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)
        # The running one if there is one (compose may be removing the old one right now), else the newest.
        return max(found, key=lambda c: (c.status == "running", c.attrs["Created"])) if found else None

    def _compose(self, *args: str) -> str:
        cmd = [*self.settings.compose, *args]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=600, check=False, env=self._env
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"compose {args[0]}: {exc}") from exc
        if done.returncode != 0:
            raise DeployError(f"compose {args[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return done.stdout


def _info(image_id: str, digests: list[str]) -> ImageInfo:
    return ImageInfo(image_id, digests[0].rpartition("@")[2] if digests else None)
