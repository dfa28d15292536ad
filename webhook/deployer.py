"""One deploy at a time: requests that arrive meanwhile join a single follow-up deploy.

A deploy waits for its window (never a recreate in the minutes around an hourly close, nor outside the
maintenance window), pulls the tag compose names, and runs the new image *by digest*; it then waits for
the container's health check. Only an image that passed is written to the pin file, which is what
compose runs on the next boot; one that did not is replaced by the previous digest, which must turn
healthy again. After a good deploy old images of the repository are pruned. Every step is recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from webhook.clock import Clock, DeployWindow, SystemClock
from webhook.engine import DeployError, ImageInfo, Unhealthy, reference_repository
from webhook.metrics import DEFERRED, DEPLOY_SECONDS, DEPLOYS, PRUNED_BYTES
from webhook.records import Deployment, Records, Trigger

log = logging.getLogger(__name__)


class DockerSide(Protocol):
    def image_reference(self) -> str: ...
    def pull(self, reference: str) -> ImageInfo: ...
    def running(self, repository: str) -> ImageInfo | None: ...
    def recreate(self, pinned: str) -> None: ...
    def wait_healthy(self, timeout_s: float) -> None: ...
    def read_pin(self) -> str | None: ...
    def write_pin(self, pinned: str) -> None: ...
    def prune(self, repository: str, keep: set[str]) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Plan:
    """A pulled image that may replace what runs: decided before the window is checked again."""

    repository: str
    before: ImageInfo | None
    after: ImageInfo
    pinned: str  # after, by digest


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"


class Deployer:
    def __init__(
        self,
        engine: DockerSide,
        records: Records,
        health_timeout_s: float,
        *,
        window: DeployWindow | None = None,
        clock: Clock | None = None,
        keep_images: int = 3,
        listeners: Sequence[Callable[[Deployment], None]] = (),
    ) -> None:
        self.engine = engine
        self.records = records
        self.health_timeout_s = health_timeout_s
        self.window = window or DeployWindow(quiet=None)
        self.clock = clock or SystemClock()
        self.keep_images = keep_images
        self.listeners = list(listeners)
        self._wake = asyncio.Event()
        self._wake.set()  # deploys queued before a restart run at once
        self._nudge = asyncio.Event()  # a new request or a stop: look at the window again
        self._stopping = False
        self.idle = asyncio.Event()
        self.idle.set()

    def request(
        self, tag: str, pushed_at: float, trigger: Trigger = "webhook", *, force: bool = False
    ) -> tuple[Deployment, bool]:
        """Queue a deploy (or join the waiting one); returns it and whether it was coalesced.

        ``force`` (asked for by hand) deploys even outside the deploy windows.
        """
        deployment, coalesced = self.records.queue(
            tag, pushed_at, trigger, force=force, clock_unsynced=not self.clock.synchronized()
        )
        self._wake.set()
        self._nudge.set()
        return deployment, coalesced

    @property
    def busy(self) -> bool:
        """A deploy is under way or waiting (the poller then has nothing to add)."""
        return not self.idle.is_set() or self.records.next_queued() is not None

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
        """Until the deploy under way (if any) has ended: stopping mid-recreate could leave no appliance.

        A deploy still waiting for its window stays queued for the next start.
        """
        self._stopping = True
        self._nudge.set()
        await self.idle.wait()

    async def _run_queued(self) -> None:
        while not self._stopping and (waiting := self.records.next_queued()) is not None:
            ended = await self._run_one(waiting.id)
            if ended is None:
                return
            DEPLOYS.labels(ended.state).inc()
            if ended.started_at and ended.finished_at:
                DEPLOY_SECONDS.observe(ended.finished_at - ended.started_at)

    async def _run_one(self, deployment_id: int) -> Deployment | None:
        """The deploy, or None if the service is stopping (it then stays waiting)."""
        while await self._until_open(deployment_id):
            # The blocking Docker work runs in a thread; this loop waits for it, so never two.
            self.idle.clear()
            try:
                prepared = await asyncio.to_thread(self._prepare, deployment_id)
                if isinstance(prepared, Deployment):
                    return prepared
                if self._stopping:
                    self._step(deployment_id, state="queued")
                    return None
                if self._open_now(deployment_id):
                    return await asyncio.to_thread(self._apply, deployment_id, prepared)
            finally:
                self.idle.set()
            # The pull ran into a closed window: wait, then pull again (a newer push may have come).
        return None

    def _open_now(self, deployment_id: int) -> bool:
        d = self.records.get(deployment_id)
        now = self.clock.time()
        return bool(d and d.force) or self.window.opens_at(now) <= now

    async def _until_open(self, deployment_id: int) -> bool:
        """Until the window is open for this deploy (True), or the service stops (False)."""
        while True:
            self._nudge.clear()
            d = self.records.get(deployment_id)
            if d is None:
                return False
            now = self.clock.time()
            opens = now if d.force else self.window.opens_at(now)
            if opens <= now:
                return not self._stopping
            if d.state != "deferred" or d.deferred_until != opens:
                if d.state != "deferred":
                    DEFERRED.inc()
                self._step(deployment_id, state="deferred", deferred_until=opens)
                log.info("deploy deferred to its window", extra={"deployment": deployment_id,
                         "until": opens, "in_s": round(opens - now)})  # fmt: skip
            if self._stopping:
                return False
            # Look again at least every minute: the wall clock can jump (NTP), and windows are wall time.
            sleep = asyncio.ensure_future(self.clock.sleep(min(opens - now, 60.0)))
            nudge = asyncio.ensure_future(self._nudge.wait())
            await asyncio.wait({sleep, nudge}, return_when=asyncio.FIRST_COMPLETED)
            sleep.cancel()
            nudge.cancel()

    # -- the deploy thread ----------------------------------------------------------------------------------

    def _prepare(self, deployment_id: int) -> Plan | Deployment:
        """Pull the tag and decide: a plan to recreate, or the deploy's end (unchanged, skipped, failed)."""
        d = self._step(deployment_id, state="pulling", started_at=self.clock.time())
        log.info(
            "deploy started",
            extra={"deployment": deployment_id, "trigger": d.trigger, "triggers": d.triggers},
        )
        try:
            reference = self.engine.image_reference()
            repository = reference_repository(reference)
            before = self.engine.running(repository)
            after = self.engine.pull(reference)
            self._step(deployment_id, image=reference, after_image_id=after.id, after_digest=after.digest,
                       after_version=after.version, before_image_id=before and before.id,
                       before_digest=before and before.digest,
                       before_version=before and before.version)  # fmt: skip
            if before is not None and after.id == before.id:
                return self._end(deployment_id, "unchanged")
            if self.records.failed_before(after.id):
                return self._end(
                    deployment_id, "skipped", error=f"image {after.id[:19]} failed its health check before"
                )
            if after.pinned is None:
                raise DeployError(f"{reference} has no digest in {repository}: it cannot be pinned")
            return Plan(repository, before, after, after.pinned)
        except Exception as exc:  # whatever went wrong (the SDK, compose, a timeout), nothing changed yet
            error = describe(exc)
            log.error("deploy failed", extra={"deployment": deployment_id, "error": error})
            return self._end(deployment_id, "failed", error=error)

    def _apply(self, deployment_id: int, plan: Plan) -> Deployment:
        self._step(deployment_id, state="deploying")
        try:
            self.engine.recreate(plan.pinned)
            self._step(deployment_id, state="verifying")
            self.engine.wait_healthy(self.health_timeout_s)
        except Exception as exc:
            error = describe(exc)
            log.error("deploy failed", extra={"deployment": deployment_id, "error": error})
            if isinstance(exc, Unhealthy):  # only the image's own failure keeps it from being tried again
                self.records.update(deployment_id, health_failed=1)
            return self._roll_back(deployment_id, plan, error)
        note = self._pin(plan.pinned)
        removed, freed = self._prune(plan)
        return self._end(deployment_id, "succeeded", error=note, images_removed=removed, bytes_freed=freed)

    def _roll_back(self, deployment_id: int, plan: Plan, error: str) -> Deployment:
        previous = plan.before.pinned if plan.before else None
        if previous is None:
            return self._end(
                deployment_id, "failed", error=f"{error}; no earlier image by digest to go back to"
            )
        self._step(deployment_id, state="rolling_back", error=error)
        log.warning("rolling back", extra={"deployment": deployment_id, "image": previous})
        try:
            self.engine.recreate(previous)
            self.engine.wait_healthy(self.health_timeout_s)
        except Exception as exc:
            return self._end(deployment_id, "failed", error=f"{error}; rollback failed too: {describe(exc)}")
        self.records.update(deployment_id, rolled_back=1)
        self._pin(previous)
        return self._end(deployment_id, "rolled_back", error=error)

    def _pin(self, pinned: str) -> str | None:
        """Make ``pinned`` what the next boot starts; the reason if that failed (what runs is fine)."""
        try:
            if self.engine.read_pin() != pinned:
                self.engine.write_pin(pinned)
        except OSError as exc:
            log.error(
                "pin file not written: a reboot would start the previous image", extra={"error": str(exc)}
            )
            return f"pin file not written: {exc}"
        return None

    def _prune(self, plan: Plan) -> tuple[int | None, int | None]:
        """Keep what runs and the newest images that passed before it (for rollback); remove the rest."""
        keep = {plan.after.id, *self.records.passed(self.keep_images)}
        try:
            removed, freed = self.engine.prune(plan.repository, keep)
        except Exception as exc:
            log.warning("pruning failed", extra={"error": describe(exc)})
            return None, None
        PRUNED_BYTES.inc(freed)
        log.info("old images pruned", extra={"removed": removed, "bytes_freed": freed, "kept": len(keep)})
        return removed, freed

    def adopt_running(self) -> None:
        """With no pin yet (a first start), pin what runs: from now on only a gated deploy changes it."""
        try:
            if self.engine.read_pin() is not None:
                return
            running = self.engine.running(reference_repository(self.engine.image_reference()))
        except Exception as exc:
            log.warning("could not read what runs at start", extra={"error": describe(exc)})
            return
        if running is None or running.pinned is None:
            log.warning("nothing to pin yet: the service runs no image from the registry",
                        extra={"image": running.id[:19] if running else None})  # fmt: skip
            return
        self._pin(running.pinned)
        log.info("pinned the image that runs", extra={"image": running.pinned})

    def _step(self, deployment_id: int, **fields: Any) -> Deployment:
        changed = self.records.update(deployment_id, **fields)
        if "state" in fields:
            for listener in self.listeners:
                try:
                    listener(changed)
                except Exception:
                    log.exception("deployment listener failed", extra={"deployment": deployment_id})
        return changed

    def _end(self, deployment_id: int, state: str, error: str | None = None, **fields: Any) -> Deployment:
        ended = self._step(deployment_id, state=state, finished_at=self.clock.time(),
                           **({"error": error} if error else {}), **fields)  # fmt: skip
        seconds = round((ended.finished_at or 0) - (ended.started_at or 0), 1)
        log.info("deploy ended", extra={"deployment": deployment_id, "state": state, "error": error or "",
                                        "seconds": seconds})  # fmt: skip
        return ended
