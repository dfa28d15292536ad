"""The Docker side of a deploy: the docker SDK for images and containers, Compose for the service.

Blocking calls, run in a worker thread by the deployer. The image deployed is the one compose.yaml
names for the service: the receiver never takes an image name from a request. Compose runs it by
digest (``image@sha256:…``, the pin), so only an image that passed the gate starts on the next boot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import docker
from docker.errors import DockerException, NotFound

from webhook.settings import PIN_VARIABLE, WebhookSettings

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A step failed; the message says which and why."""


class Unhealthy(DeployError):
    """The new container never passed its health check: the image itself is at fault."""


VERSION_LABEL = "org.opencontainers.image.version"


@dataclass(frozen=True)
class ImageInfo:
    id: str
    digest: str | None  # in the repository compose names (an image can be in several)
    version: str | None = None  # the image's version label (the release, as /health shows it)
    pinned: str | None = None  # repository@digest: how compose runs exactly this image


def split_reference(reference: str) -> tuple[str, str]:
    """'host:5000/ns/app:v2' -> ('host:5000/ns/app', 'v2'); no tag means 'latest'."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


def familiar(repository: str) -> str:
    """The name Docker shows for a repository: 'docker.io/library/x' and 'x' are the same one."""
    for prefix in ("docker.io/", "index.docker.io/"):
        repository = repository.removeprefix(prefix)
    return repository.removeprefix("library/")


def reference_repository(reference: str) -> str:
    """The repository of 'repo:tag' or 'repo@sha256:…'."""
    return reference.partition("@")[0] if "@" in reference else split_reference(reference)[0]


class Engine:
    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.client = docker.from_env()
        # Compose gets the environment without the webhook's own settings (its token among them) and
        # without a pin of its own: each call says which image it runs.
        self._env = {k: v for k, v in os.environ.items()
                     if not k.startswith("CRYPTOPI_WEBHOOK_") and k != PIN_VARIABLE}  # fmt: skip

    def image_reference(self) -> str:
        """The service's image as compose resolves it without a pin: the tag a push moves."""
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
        return _info(image.id, image.attrs, repository)

    def running(self, repository: str) -> ImageInfo | None:
        """The image of the service's current container, if there is one."""
        container = self._container()
        if container is None:
            return None
        image_id = container.attrs["Image"]
        try:
            attrs = self.client.images.get(image_id).attrs
        except NotFound:
            attrs = {}
        return _info(image_id, attrs, repository)

    def recreate(self, pinned: str) -> None:
        """Run ``pinned`` (repository@digest) as the service: compose recreates it if that changed."""
        self._compose("up", "--detach", "--no-deps", "--pull", "never", self.settings.service, pin=pinned)

    def read_pin(self) -> str | None:
        try:
            text = self.settings.pin_file.read_text()
        except FileNotFoundError:
            return None
        value = text.partition(f"{PIN_VARIABLE}=")[2].strip()
        return value or None

    def write_pin(self, pinned: str) -> None:
        """What the next ``compose up`` (a boot, a restart) runs; replaced atomically, synced to disk."""
        path = self.settings.pin_file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("w") as f:
            f.write("# Written by the cryptopi webhook: the image that last passed its health gate.\n"
                    f"{PIN_VARIABLE}={pinned}\n")  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        partial.chmod(0o644)  # cryptopi.service (root) reads it; nothing in it is secret
        os.replace(partial, path)

    def prune(self, repository: str, keep: set[str]) -> tuple[int, int]:
        """Remove this repository's images but ``keep`` (image ids); returns (removed, bytes freed).

        Only the repository's own references are removed: an image also tagged elsewhere stays, and
        one that a container still uses is left (with a log line). Bytes are the engine's layer total
        before and after, so layers shared with a kept image count for nothing.
        """
        before, removed = self._layers_size(), 0
        for image in self.client.images.list():
            refs = [r for r in [*image.tags, *image.attrs.get("RepoDigests", [])]
                    if familiar(reference_repository(r)) == familiar(repository)]  # fmt: skip
            if image.id in keep or not refs:
                continue
            try:
                for ref in refs:  # the last reference removed deletes the image
                    with contextlib.suppress(NotFound):  # gone with an earlier one (its last tag)
                        self.client.images.remove(ref)
            except DockerException as exc:
                log.warning("image not pruned", extra={"image": image.id[:19], "error": str(exc)[:300]})
                continue
            removed += 1
        return removed, max(0, before - self._layers_size())

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

    def _layers_size(self) -> int:
        return int(self.client.df().get("LayersSize") or 0)

    def _compose(self, *args: str, pin: str | None = None) -> str:
        cmd = [*self.settings.compose, *args]
        env = self._env | ({PIN_VARIABLE: pin} if pin else {})
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"compose {args[0]}: {exc}") from exc
        if done.returncode != 0:
            raise DeployError(f"compose {args[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return done.stdout


def _info(image_id: str, attrs: dict[str, Any], repository: str) -> ImageInfo:
    digests = [d.rpartition("@")[2] for d in attrs.get("RepoDigests") or []
               if familiar(reference_repository(d)) == familiar(repository)]  # fmt: skip
    version = ((attrs.get("Config") or {}).get("Labels") or {}).get(VERSION_LABEL)
    digest = digests[0] if digests else None
    return ImageInfo(image_id, digest, version, f"{repository}@{digest}" if digest else None)
