"""Docker Hub's push payload at its edges: field limits, and the stale, future and clock-slack times."""

import json
from typing import Any

import pytest

from webhook.payload import BadPayload, DockerHubPush, ignore_reason, parse_push

NOW = 1_800_000_000.0
HOUR = 3600.0
REPO_NAME = "cryptopi/appliance"


def body(**push_data: Any) -> dict[str, Any]:
    return {
        "push_data": {"tag": "latest", "pushed_at": NOW} | push_data,
        "repository": {"repo_name": REPO_NAME},
    }


def reason(push: DockerHubPush) -> str | None:
    return ignore_reason(push, repository=REPO_NAME, tag_pattern=r"latest|v\d+", now=NOW, max_age_s=HOUR)


def at(pushed_at: float) -> DockerHubPush:
    return parse_push(json.dumps(body(pushed_at=pushed_at)).encode())


@pytest.mark.parametrize(
    ("pushed_at", "expected"),
    [
        (NOW, None),
        (NOW - HOUR, None),  # exactly as old as allowed
        (NOW - HOUR - 0.001, "stale push: pushed_at is 3600 s old (most 3600)"),
        (NOW - 2 * HOUR, "stale push: pushed_at is 7200 s old (most 3600)"),
        (NOW + 300, None),  # 300 s of clock slack: Docker Hub's clock and the Pi's differ
        (NOW + 300.001, "pushed_at is in the future"),
    ],
    ids=["now", "at the age limit", "just past the age limit", "an hour stale", "at the slack",
         "just past the slack"],
)  # fmt: skip
def test_push_times_at_their_limits(pushed_at: float, expected: str | None) -> None:
    assert reason(at(pushed_at)) == expected


def test_repository_and_tag_must_match_whole() -> None:
    other = parse_push(json.dumps(body() | {"repository": {"repo_name": "cryptopi/other"}}).encode())
    assert reason(other) == "repository cryptopi/other is not cryptopi/appliance"
    for tag in ("v7", "latest"):
        assert reason(parse_push(json.dumps(body(tag=tag)).encode())) is None
    for tag in ("v", "latest1", "xlatest", "v7a"):
        assert (
            reason(parse_push(json.dumps(body(tag=tag)).encode())) == rf"tag {tag} does not match latest|v\d+"
        )


def long_repository(n: int) -> str:
    return "a/" + "b" * (n - 2)


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("pushed_at zero", lambda b: b["push_data"].update(pushed_at=0)),
        ("pusher of 255", lambda b: b["push_data"].update(pusher="p" * 255)),
        ("pusher null", lambda b: b["push_data"].update(pusher=None)),
        ("tag of 128", lambda b: b["push_data"].update(tag="v" * 128)),
        ("repo_name of 255", lambda b: b["repository"].update(repo_name=long_repository(255))),
        ("callback_url of 2048", lambda b: b.update(callback_url="h" * 2048)),
        ("unknown fields", lambda b: b.update(extra={"x": 1})),
    ],
)
def test_fields_at_their_limits_parse(case: str, change: Any) -> None:
    doc = body()
    change(doc)
    assert isinstance(parse_push(json.dumps(doc).encode()), DockerHubPush)


@pytest.mark.parametrize(
    ("case", "change", "says"),
    [
        ("pushed_at negative", lambda b: b["push_data"].update(pushed_at=-0.001),
         "push_data.pushed_at: Input should be greater than or equal to 0"),
        ("pushed_at infinite", lambda b: b["push_data"].update(pushed_at=float("inf")),
         "push_data.pushed_at: Input should be a finite number"),
        ("pusher of 256", lambda b: b["push_data"].update(pusher="p" * 256),
         "push_data.pusher: String should have at most 255 characters"),
        ("repo_name of 256", lambda b: b["repository"].update(repo_name=long_repository(256)),
         "repository.repo_name: String should have at most 255 characters"),
        ("callback_url of 2049", lambda b: b.update(callback_url="h" * 2049),
         "callback_url: String should have at most 2048 characters"),
    ],
)  # fmt: skip
def test_fields_past_their_limits_are_refused_by_name(case: str, change: Any, says: str) -> None:
    doc = body()
    change(doc)
    with pytest.raises(BadPayload, match=f"^{says}$"):
        parse_push(json.dumps(doc).encode().replace(b"Infinity", b"1e999"))


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{", r"^body is not JSON: Invalid JSON: EOF while parsing"),
        (b"[]", r"^body: Input should be an object$"),
    ],
)
def test_bodies_that_are_not_a_push_say_so(raw: bytes, says: str) -> None:
    with pytest.raises(BadPayload, match=says):
        parse_push(raw)
