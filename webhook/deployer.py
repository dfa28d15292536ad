"""One deploy at a time: pushes that arrive meanwhile join a single follow-up deploy.

A deploy pulls the image compose names, records what was running, recreates the service, and waits
for the container's health check. If the new container is not healthy in time, the previous image
is put back and must turn healthy again. Every step is written to the records as it happens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from appliance.helpers.mqtt import mqtt_client
from webhook.engine import DeployError, ImageInfo, Unhealthy
from webhook.metrics import DEPLOY_SECONDS, DEPLOYS
from webhook.records import Deployment, Records

log = logging.getLogger(__name__)


class DockerSide(Protocol):
    def image_reference(self) -> str: ...
    def pull(self, reference: str) -> ImageInfo: ...
    def running(self) -> ImageInfo | None: ...
    def retag(self, image_id: str, reference: str) -> None: ...
    def recreate(self) -> None: ...
    def wait_healthy(self, timeout_s: float) -> None: ...


class Deployer:
    def __init__(
        self,
        engine: DockerSide,
        records: Records,
        health_timeout_s: float,
        notify: Callable[[Deployment], None] = lambda d: None,
    ) -> None:
        self.engine = engine
        self.records = records
        self.health_timeout_s = health_timeout_s
        self.notify = notify
        self._wake = asyncio.Event()
        self._wake.set()  # deploys queued before a restart run at once
        self.idle = asyncio.Event()
        self.idle.set()

    def request(self, tag: str, pushed_at: float) -> tuple[Deployment, bool]:
        """Queue a deploy (or join the queued one); returns it and whether it was coalesced."""
        deployment, coalesced = self.records.queue(tag, pushed_at)
        self._wake.set()
        return deployment, coalesced

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._run_queued()
            except Exception:  # the records themselves failed (a full disk...): log, wait, try again
                log.exception("deploy loop error; retrying in 30 s")
                await asyncio.sleep(30)
                self._wake.set()

    async def drain(self) -> None:
        """Until the deploy under way (if any) has ended: stopping mid-recreate could leave no appliance."""
        await self.idle.wait()

    async def _run_queued(self) -> None:
        while (deployment := self.records.next_queued()) is not None:
            # The blocking Docker work runs in a thread; this loop waits for it, so never two.
            self.idle.clear()
            try:
                ended = await asyncio.to_thread(self.deploy, deployment)
            finally:
                self.idle.set()
            DEPLOYS.labels(ended.state).inc()
            if ended.started_at and ended.finished_at:
                DEPLOY_SECONDS.observe(ended.finished_at - ended.started_at)
            await asyncio.to_thread(self.notify, ended)

    def deploy(self, d: Deployment) -> Deployment:
        step = functools.partial(self.records.update, d.id)
        step(state="pulling", started_at=time.time())
        log.info("deploy started", extra={"deployment": d.id, "tag": d.trigger_tag, "triggers": d.triggers})
        reference: str | None = None
        before: ImageInfo | None = None
        pulled = touched = False  # whether the local tag, then the running service, may have changed
        try:
            reference = self.engine.image_reference()
            before = self.engine.running()
            pulled = True
            after = self.engine.pull(reference)
            step(image=reference, after_image_id=after.id, after_digest=after.digest,
                 before_image_id=before and before.id, before_digest=before and before.digest)  # fmt: skip
            if before is not None and after.id == before.id:
                return self._end(d.id, "unchanged")
            if self.records.failed_before(after.id):
                self._restore_tag(before, reference)  # or the next `compose up` (a reboot) would run it
                return self._end(
                    d.id, "skipped", error=f"image {after.id[:19]} failed its health check before"
                )
            step(state="deploying")
            touched = True
            self.engine.recreate()
            step(state="verifying")
            self.engine.wait_healthy(self.health_timeout_s)
            return self._end(d.id, "succeeded")
        except Exception as exc:  # whatever went wrong (the SDK, compose, a timeout), the deploy ends here
            error = str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"
            log.error("deploy failed", extra={"deployment": d.id, "error": error})
            if isinstance(exc, Unhealthy):
                self.records.update(d.id, health_failed=1)
            if touched and before is not None and reference is not None:
                return self._roll_back(d.id, before, reference, error)
            if pulled and reference is not None:
                self._restore_tag(before, reference)
            return self._end(d.id, "failed", error=error)

    def _roll_back(self, deployment_id: int, before: ImageInfo, reference: str, error: str) -> Deployment:
        self.records.update(deployment_id, state="rolling_back", error=error)
        log.warning("rolling back", extra={"deployment": deployment_id, "image": before.id[:19]})
        try:
            self.engine.retag(before.id, reference)
            self.engine.recreate()
            self.engine.wait_healthy(self.health_timeout_s)
        except Exception as exc:
            return self._end(deployment_id, "failed", error=f"{error}; rollback failed too: {exc}")
        self.records.update(deployment_id, rolled_back=1)
        return self._end(deployment_id, "rolled_back", error=error)

    def _restore_tag(self, before: ImageInfo | None, reference: str) -> None:
        """Point the reference back at what runs, so that only a gated deploy ever changes it."""
        if before is None:
            return
        try:
            self.engine.retag(before.id, reference)
        except Exception as exc:
            log.error("could not restore the image tag", extra={"reference": reference, "error": str(exc)})

    def _end(self, deployment_id: int, state: str, error: str | None = None) -> Deployment:
        ended = self.records.update(deployment_id, state=state, **({"error": error} if error else {}))
        log.info("deploy ended", extra={"deployment": deployment_id, "state": state, "error": error or ""})
        return ended


def mqtt_notifier(url: str, device_id: str) -> Callable[[Deployment], None]:
    """Publish each ended deployment, retained, to ``cryptopi/<device>/deployment``: best effort."""

    def notify(d: Deployment) -> None:
        client, broker = mqtt_client(url, f"cryptopi-webhook-{device_id}")
        try:
            client.connect(broker.host, broker.port, keepalive=10)
            client.loop_start()
            sent = client.publish(f"cryptopi/{device_id}/deployment", d.model_dump_json(), qos=1, retain=True)
            sent.wait_for_publish(timeout=5)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("deployment not published to MQTT", extra={"deployment": d.id, "error": str(exc)})
        finally:
            client.disconnect()
            client.loop_stop()

    return notify
