"""The webhook receiver's HTTP edge: hostile and malformed pushes deploy nothing and say why.

The Docker side is a spy that fails the test if a deploy ever reaches it; real deploys (pull,
recreate, health gate, rollback) are exercised against a real engine in test_delivery_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, wait_for
from webhook.__main__ import init
from webhook.app import create_app
from webhook.deployer import Deployer
from webhook.engine import ImageInfo, Unhealthy, split_reference
from webhook.records import Records
from webhook.settings import WebhookSettings, load_settings

TOKEN = "t" * 20 + "0123456789_-abcdefghijklmnopqrstuvwxyz"
REPO_NAME = "cryptopi/appliance"
DOCS_PAYLOAD = REPO / "tests" / "data" / "dockerhub_webhook_payload.json"


class NoDocker:
    """Any call means a push got through to a deploy: the test fails on it."""

    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name: str) -> Any:
        def called(*args: object) -> ImageInfo:
            self.calls.append(name)
            raise AssertionError(f"docker side reached: {name}")

        return called


def push(
    tag: str = "latest", repo: str = REPO_NAME, pushed_at: float | None = None, **extra: object
) -> dict[str, Any]:
    when = time.time() if pushed_at is None else pushed_at
    return {
        "callback_url": "https://registry.hub.docker.com/u/x/hook/1/",
        "push_data": {"pushed_at": when, "pusher": "ci", "tag": tag},
        "repository": {"repo_name": repo, "name": str(repo).rsplit("/", maxsplit=1)[-1]},
        **extra,
    }


@pytest.fixture
def settings(tmp_path: Path) -> WebhookSettings:
    return WebhookSettings(token=TOKEN, repository=REPO_NAME, tag_pattern=r"latest|v\d+", state_dir=tmp_path)


@pytest.fixture
def records(settings: WebhookSettings) -> Iterator[Records]:
    r = Records(settings.state_dir / "deployments.sqlite3")
    yield r
    r.close()


@pytest.fixture
async def client(settings: WebhookSettings, records: Records) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, records, Deployer(NoDocker(), records, 1.0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hook") as c:
        yield c


HOOK = f"/hooks/dockerhub/{TOKEN}"
BIG = json.dumps(push(extra="x" * 70_000)).encode()
WRONG_TOKENS = ["", "x", TOKEN[:-1], TOKEN + "a", TOKEN.upper(), TOKEN[::-1], "..%2F..%2Fetc%2Fpasswd",
                "%00" + TOKEN, TOKEN + "%00", "é" * 43, "a" * 5000]  # fmt: skip
MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("truncated JSON", b'{"push_data": {', 400, "not JSON"),
    ("empty body", b"", 400, "not JSON"),
    ("array", b"[]", 400, "body"),
    ("string", b'"latest"', 400, "body"),
    ("null", b"null", 400, "body"),
    ("number", b"42", 400, "body"),
    ("trailing garbage", json.dumps(push()).encode() + b"}}", 400, "not JSON"),
    ("byte order mark", b"\xef\xbb\xbf" + json.dumps(push()).encode(), 400, "not JSON"),
    ("UTF-16", json.dumps(push()).encode("utf-16"), 400, "not JSON"),
    ("NaN", json.dumps(push(pushed_at=float("nan"))).encode(), 400, "pushed_at"),
    ("deeply nested", b'{"push_data":' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "recursion limit exceeded"),
    ("missing push_data", json.dumps({"repository": {"repo_name": REPO_NAME}}).encode(), 400, "push_data"),
    ("missing repository", json.dumps({"push_data": push()["push_data"]}).encode(), 400, "repository"),
    ("push_data a string", json.dumps(push() | {"push_data": "latest"}).encode(), 400, "push_data"),
    ("repository a list", json.dumps(push() | {"repository": [REPO_NAME]}).encode(), 400, "repository"),
]  # fmt: skip
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("tag a number", push(tag=1), "push_data.tag"),  # type: ignore[arg-type]
    ("tag null", push(tag=None), "push_data.tag"),  # type: ignore[arg-type]
    ("tag a list", push(tag=["latest"]), "push_data.tag"),  # type: ignore[arg-type]
    ("tag empty", push(tag=""), "push_data.tag"),
    ("tag path traversal", push(tag="../../etc/passwd"), "push_data.tag"),
    ("tag with a slash", push(tag="latest/../v1"), "push_data.tag"),
    ("tag with a newline", push(tag="latest\nv2"), "push_data.tag"),
    ("tag with a shell", push(tag="latest;rm -rf /"), "push_data.tag"),
    ("tag 129 chars", push(tag="v" * 129), "push_data.tag"),
    ("tag unicode", push(tag="lätest"), "push_data.tag"),
    ("pushed_at a word", push(pushed_at="soon"), "push_data.pushed_at"),  # type: ignore[arg-type]
    ("pushed_at negative", push(pushed_at=-1), "push_data.pushed_at"),
    ("pushed_at missing", {**push(), "push_data": {"tag": "latest"}}, "push_data.pushed_at"),
    ("repo_name a number", push(repo=7), "repository.repo_name"),  # type: ignore[arg-type]
    ("repo_name path traversal", push(repo="../../var/run/docker"), "repository.repo_name"),
    ("repo_name absolute", push(repo="/cryptopi/appliance"), "repository.repo_name"),
    ("repo_name upper case", push(repo="Cryptopi/Appliance"), "repository.repo_name"),
    ("repo_name with a registry", push(repo="evil.example:5000/cryptopi/appliance"), "repository.repo_name"),
    ("repo_name with a tag", push(repo="cryptopi/appliance:latest"), "repository.repo_name"),
    ("repo_name with a NUL", push(repo="cryptopi/appliance\u0000"), "repository.repo_name"),
]  # fmt: skip
IGNORED: list[tuple[str, dict[str, Any], str]] = [
    ("another repository", push(repo="someone/else"), "is not cryptopi/appliance"),
    ("a look-alike repository", push(repo="cryptopi/appliance-evil"), "is not"),
    ("a tag outside the pattern", push(tag="dev"), "does not match"),
    ("a tag that only starts like one", push(tag="latest-rc1"), "does not match"),
    ("a tag that only ends like one", push(tag="not-latest"), "does not match"),
    ("a stale push", push(pushed_at=time.time() - 7200), "stale"),
    ("a push from the future", push(pushed_at=time.time() + 86_400), "future"),
    ("an image name smuggled in", push(image="evil/miner:latest", repo="evil/miner"), "is not"),
    ("callback to a private address", push(repo="x/y", callback_url="http://10.0.0.1/steal"), "is not"),
]  # fmt: skip


async def assert_no_deploys(client: httpx.AsyncClient, records: Records) -> None:
    assert records.recent() == []
    metrics = (await client.get("/metrics")).text
    assert 'cryptopi_webhook_requests_total{outcome="accepted"} 0.0' in metrics


@pytest.mark.parametrize("token", WRONG_TOKENS)
async def test_a_wrong_token_is_a_404_and_causes_nothing(
    client: httpx.AsyncClient, records: Records, token: str
) -> None:
    answer = await client.post(f"/hooks/dockerhub/{token}", json=push())
    assert answer.status_code in (404, 405) if token == "" else answer.status_code == 404, answer.text
    assert answer.json() == {"detail": "Not Found" if answer.status_code == 404 else "Method Not Allowed"}
    await assert_no_deploys(client, records)


@pytest.mark.parametrize(("case", "body", "status", "says"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_bodies_get_a_clear_400(client: httpx.AsyncClient, records: Records, case: str,
                                                 body: bytes, status: int, says: str) -> None:  # fmt: skip
    answer = await client.post(HOOK, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert says in answer.json()["detail"]
    await assert_no_deploys(client, records)


@pytest.mark.parametrize(("case", "payload", "field"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
async def test_bad_fields_get_a_400_naming_the_field(
    client: httpx.AsyncClient, records: Records, case: str, payload: dict[str, Any], field: str
) -> None:
    answer = await client.post(HOOK, json=payload)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"{field}:"), answer.json()
    await assert_no_deploys(client, records)


@pytest.mark.parametrize(("case", "payload", "reason"), IGNORED, ids=[i[0] for i in IGNORED])
async def test_pushes_that_are_not_ours_are_ignored_with_the_reason(
    client: httpx.AsyncClient, records: Records, case: str, payload: dict[str, Any], reason: str
) -> None:
    answer = await client.post(HOOK, json=payload)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "ignored", answer.json()
    assert reason in answer.json()["reason"]
    await assert_no_deploys(client, records)


async def test_oversized_bodies_get_413_declared_or_streamed(
    client: httpx.AsyncClient, records: Records
) -> None:
    assert (await client.post(HOOK, content=BIG)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(BIG), 4096):
            yield BIG[i : i + 4096]

    answer = await client.post(HOOK, content=chunks())
    assert answer.status_code == 413
    assert "65536" in answer.json()["detail"]
    await assert_no_deploys(client, records)


async def test_replaying_docker_hubs_documented_example_deploys_nothing(
    client: httpx.AsyncClient, records: Records
) -> None:
    example = DOCS_PAYLOAD.read_bytes()
    for _ in range(3):
        answer = await client.post(HOOK, content=example)
        assert answer.status_code == 202
        assert answer.json()["status"] == "ignored"
    await assert_no_deploys(client, records)


async def test_a_good_push_queues_one_deploy_and_its_replay_is_ignored(
    client: httpx.AsyncClient, records: Records
) -> None:
    body = push(tag="v7")
    first = await client.post(HOOK, json=body)
    assert first.status_code == 202
    assert first.json() == {"status": "accepted", "reason": None, "deployment": 1, "coalesced": False}
    again = await client.post(HOOK, json=body)
    assert again.json()["status"] == "ignored"
    assert "replayed" in again.json()["reason"]
    assert [d.state for d in records.recent()] == ["queued"]


async def test_concurrent_pushes_coalesce_into_one_queued_deploy(
    client: httpx.AsyncClient, records: Records
) -> None:
    now = time.time()
    answers = await asyncio.gather(*(client.post(HOOK, json=push(pushed_at=now - i)) for i in range(20)))
    assert all(a.json()["status"] == "accepted" for a in answers)
    assert sorted(a.json()["coalesced"] for a in answers) == [False] + [True] * 19
    (queued,) = records.recent()
    assert queued.state == "queued"
    assert queued.triggers == 20


async def test_deployments_need_the_bearer_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/deployments")).status_code == 401
    assert (
        await client.get("/deployments", headers={"authorization": f"Bearer {TOKEN}x"})
    ).status_code == 401
    assert (await client.get("/deployments", headers={"authorization": f"Basic {TOKEN}"})).status_code == 401
    ok = await client.get("/deployments", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ok.json() == []


def test_settings_refuse_weak_tokens_and_bad_patterns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRYPTOPI_WEBHOOK_TOKEN", "short")
    monkeypatch.setenv("CRYPTOPI_WEBHOOK_REPOSITORY", "Not A Repo")
    monkeypatch.setenv("CRYPTOPI_WEBHOOK_TAG_PATTERN", "(")
    with pytest.raises(SystemExit) as exit_:
        load_settings()
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert "CRYPTOPI_WEBHOOK_TOKEN" in out
    assert "short" not in out
    assert "CRYPTOPI_WEBHOOK_REPOSITORY" in out
    assert "CRYPTOPI_WEBHOOK_TAG_PATTERN" in out


def test_init_writes_a_strong_token_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "webhook.env"
    assert init(env, "https://hooks.example.org/") == 0
    token = env.read_text().splitlines()[0].partition("=")[2]
    assert "CRYPTOPI_WEBHOOK_REPOSITORY=cryptopi/appliance" in env.read_text()
    assert len(token) >= 43
    assert env.stat().st_mode & 0o777 == 0o600
    assert f"https://hooks.example.org/hooks/dockerhub/{token}" in capsys.readouterr().out
    assert init(env, "https://hooks.example.org") == 1
    assert env.read_text().count("TOKEN=") == 1
    WebhookSettings(token=token, repository=REPO_NAME)  # accepted as is


@pytest.mark.parametrize(("reference", "expected"), [
    ("127.0.0.1:5000/cryptopi/appliance:v2", ("127.0.0.1:5000/cryptopi/appliance", "v2")),
    ("127.0.0.1:5000/cryptopi/appliance", ("127.0.0.1:5000/cryptopi/appliance", "latest")),
    ("cryptopi/appliance", ("cryptopi/appliance", "latest")),
    ("docker.io/cryptopi/appliance:latest", ("docker.io/cryptopi/appliance", "latest")),
])  # fmt: skip
def test_split_reference(reference: str, expected: tuple[str, str]) -> None:
    assert split_reference(reference) == expected


class ScriptedDocker:
    """The Docker side of a deploy, scripted: which images exist and which step breaks, and how."""

    def __init__(self, breaks: dict[str, Exception]) -> None:
        self.breaks = breaks
        self.running_id = "sha256:old"
        self.calls: list[str] = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.breaks:
            raise self.breaks.pop(name)

    def image_reference(self) -> str:
        return "127.0.0.1:5000/cryptopi/appliance:latest"

    def pull(self, reference: str) -> ImageInfo:
        self._step("pull")
        return ImageInfo("sha256:new", "sha256:digest")

    def running(self) -> ImageInfo | None:
        return ImageInfo(self.running_id, None)

    def retag(self, image_id: str, reference: str) -> None:
        self._step(f"retag {image_id}")

    def recreate(self) -> None:
        self._step("recreate")

    def wait_healthy(self, timeout_s: float) -> None:
        self._step("wait_healthy")


async def test_an_unexpected_error_fails_the_deploy_and_the_next_one_still_runs(records: Records) -> None:
    """A docker SDK error (not a DeployError) must end its deploy, not the deployer."""
    docker = ScriptedDocker({"pull": RuntimeError("engine went away")})
    deployer = Deployer(docker, records, 1.0)
    worker = asyncio.create_task(deployer.run())
    try:
        deployer.request("latest", time.time())
        await wait_for(lambda: records.recent()[0].state == "failed", 5, "the first deploy to fail")
        deployer.request("latest", time.time())
        await wait_for(lambda: len(records.recent()) == 2 and records.recent()[0].state == "succeeded", 5,
                       "the next deploy to succeed")  # fmt: skip
    finally:
        worker.cancel()
    failed = records.recent()[1]
    assert failed.error == "RuntimeError: engine went away"
    assert not failed.rolled_back  # nothing had changed yet: nothing to undo
    assert not records.failed_before("sha256:new")  # a broken engine says nothing about the image
    # The tag goes back to what runs after the failed pull, so a reboot's `compose up` cannot pick it up.
    assert docker.calls == ["pull", "retag sha256:old", "pull", "recreate", "wait_healthy"]


async def test_a_failure_after_the_recreate_rolls_back_to_the_previous_image(records: Records) -> None:
    docker = ScriptedDocker({"wait_healthy": Unhealthy("not healthy within 1 s")})
    deployer = Deployer(docker, records, 1.0)
    worker = asyncio.create_task(deployer.run())
    try:
        deployer.request("latest", time.time())
        await wait_for(lambda: records.recent()[0].state == "rolled_back", 5, "the rollback")
    finally:
        worker.cancel()
    assert docker.calls == [
        "pull",
        "recreate",
        "wait_healthy",
        "retag sha256:old",
        "recreate",
        "wait_healthy",
    ]
    assert records.failed_before("sha256:new")  # its own health check failed: not tried again
    ended = records.recent()[0]
    assert ended.rolled_back
    assert ended.health_failed
