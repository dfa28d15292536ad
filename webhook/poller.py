"""The fallback for missed webhooks: now and then, ask the registry what the tag points at.

Docker Hub does not retry a webhook it could not deliver (the tunnel was down, the Pi rebooting), so a
push could otherwise never be deployed. A change deploys through the same gate as a push, recorded
with the trigger ``poll``; a digest that already failed its health check here is left alone.
"""

from __future__ import annotations

import asyncio
import logging

from webhook.clock import Clock
from webhook.deployer import Deployer, DockerSide, describe
from webhook.engine import reference_repository, split_reference
from webhook.metrics import POLLS
from webhook.records import Records
from webhook.registry import RateLimited, Registry

log = logging.getLogger(__name__)


async def poll_once(engine: DockerSide, deployer: Deployer, records: Records, clock: Clock,
                    registries: dict[str, Registry]) -> str:  # fmt: skip
    """One look at the registry; returns the outcome (the metric's label)."""
    if deployer.busy:
        return "busy"
    reference = await asyncio.to_thread(engine.image_reference)
    registry = registries.get(reference)
    if registry is None:
        registries[reference] = registry = Registry(reference)
    remote = await asyncio.to_thread(registry.digest)
    running = await asyncio.to_thread(engine.running, reference_repository(reference))
    if running is not None and running.digest == remote:
        return "unchanged"
    if records.digest_failed(remote):
        return "failed_before"
    deployment, _ = deployer.request(split_reference(reference)[1], clock.time(), "poll")
    log.info("registry has a new digest: deploying", extra={"digest": remote, "deployment": deployment.id,
             "running": running.digest if running else None})  # fmt: skip
    return "changed"


async def poll_forever(engine: DockerSide, deployer: Deployer, records: Records, clock: Clock,
                       interval_s: float) -> None:  # fmt: skip
    registries: dict[str, Registry] = {}
    delay = min(interval_s, 60.0)  # soon after a start: a push may have been missed while it was down
    while True:
        await asyncio.sleep(delay)
        delay = interval_s
        try:
            outcome = await poll_once(engine, deployer, records, clock, registries)
        except RateLimited as exc:
            outcome, delay = "rate_limited", max(interval_s, exc.retry_after_s)
            log.warning("registry rate limit: polling less", extra={"next_in_s": round(delay)})
        except Exception as exc:  # the registry or the engine is away: try again next time
            outcome = "error"
            log.warning("registry poll failed", extra={"error": describe(exc)})
        POLLS.labels(outcome).inc()
