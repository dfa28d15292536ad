"""Docker Hub's push payload, and whether a push should deploy: pure functions, no I/O.

Docker Hub signs nothing, so the payload is only a trigger: it can make the receiver *look* for a new
image, never choose which image runs (that is compose's own configuration).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from webhook.settings import REPOSITORY_PATTERN

#: Docker's tag grammar: no "/", no "..", at most 128 characters.
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
MAX_BODY_BYTES = 64 * 1024
REPLAYED = "replayed push: this tag and pushed_at were received before"
#: How far ahead of this clock a push may claim to be (Docker Hub's and the Pi's clocks differ).
CLOCK_SLACK_S = 300.0


class PushData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tag: str = Field(pattern=TAG_PATTERN)
    pushed_at: float = Field(ge=0, allow_inf_nan=False, description="Epoch seconds")
    pusher: str | None = Field(None, max_length=255)


class Repository(BaseModel):
    model_config = ConfigDict(extra="ignore")
    repo_name: str = Field(max_length=255, pattern=REPOSITORY_PATTERN)


class DockerHubPush(BaseModel):
    model_config = ConfigDict(extra="ignore")
    push_data: PushData
    repository: Repository
    callback_url: str | None = Field(None, max_length=2048, description="Legacy; never used")


class BadPayload(ValueError):
    """The body is not a Docker Hub push: the message names the field."""


def parse_push(body: bytes) -> DockerHubPush:
    try:
        return DockerHubPush.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(map(str, error["loc"]))
        if error["type"] == "json_invalid":
            raise BadPayload(f"body is not JSON: {error['msg']}") from None
        raise BadPayload(f"{where or 'body'}: {error['msg']}") from None


def ignore_reason(
    push: DockerHubPush,
    *,
    repository: str,
    tag_pattern: str,
    now: float,
    max_age_s: float,
    clock_synced: bool = True,
) -> str | None:
    """Why this push deploys nothing, or None if it should trigger a deploy (unless it is a replay).

    Until NTP has set the clock (a Pi has no real-time clock) a push's age says nothing: it is not checked.
    """
    if push.repository.repo_name != repository:
        return f"repository {push.repository.repo_name} is not {repository}"
    if not re.fullmatch(tag_pattern, push.push_data.tag):
        return f"tag {push.push_data.tag} does not match {tag_pattern}"
    if not clock_synced:
        return None
    if push.push_data.pushed_at < now - max_age_s:
        return f"stale push: pushed_at is {now - push.push_data.pushed_at:.0f} s old (most {max_age_s:.0f})"
    if push.push_data.pushed_at > now + CLOCK_SLACK_S:
        return "pushed_at is in the future"
    return None
