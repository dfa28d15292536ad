"""The webhook receiver's HTTP edge: hostile and malformed pushes deploy nothing and say why.

The Docker side is a spy that fails the test if a deploy ever reaches it; real deploys (pull,
recreate, health gate, rollback) are exercised against a real engine in test_delivery_e2e.py. The
deployer's decisions (windows, pins, pruning, rollback) are checked here with a scripted Docker side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from datetime import time as daytime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, FakeClock, MetricDelta, wait_for
from webhook import clock as clock_module
from webhook.__main__ import init
from webhook.app import create_admin_app, create_hook_app
from webhook.clock import DeployWindow, SystemClock
from webhook.deployer import Deployer
from webhook.engine import ImageInfo, Unhealthy, split_reference
from webhook.payload import REPLAYED
from webhook.records import MIGRATIONS, Records
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
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def client(
    settings: WebhookSettings, records: Records, clock: FakeClock
) -> AsyncIterator[httpx.AsyncClient]:
    """The hook listener's app (the tunnel's origin)."""
    app = create_hook_app(settings, records, Deployer(NoDocker(), records, 1.0, clock=clock), clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hook") as c:
        yield c


@pytest.fixture
async def admin(settings: WebhookSettings, records: Records) -> AsyncIterator[httpx.AsyncClient]:
    """The local-only listener's app."""
    app = create_admin_app(settings, records, Deployer(NoDocker(), records, 1.0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://local") as c:
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


@pytest.fixture
def metrics() -> MetricDelta:
    """Counters are process-wide (other tests post pushes too): each test reads how much they grew."""
    return MetricDelta()


async def assert_no_deploys(metrics: MetricDelta, records: Records) -> None:
    assert records.recent() == []
    assert metrics("cryptopi_webhook_requests_total", outcome="accepted") == 0


@pytest.mark.parametrize("token", WRONG_TOKENS)
async def test_a_wrong_token_is_a_404_and_causes_nothing(
    metrics: MetricDelta, client: httpx.AsyncClient, records: Records, token: str
) -> None:
    answer = await client.post(f"/hooks/dockerhub/{token}", json=push())
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"detail": "Not Found"}
    await assert_no_deploys(metrics, records)


NOT_THE_HOOK = [
    ("POST", f"{HOOK}/"),  # a trailing slash: once a 307 to a Location built from Host
    ("POST", "/hooks/dockerhub/wrong/"),
    ("POST", "/hooks/dockerhub/"),
    ("POST", f"/hooks/dockerhub/{TOKEN}/extra"),
    ("POST", f"//hooks/dockerhub/{TOKEN}"),
    ("GET", HOOK),
    ("PUT", HOOK),
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/deployments"),
    ("POST", "/deploy"),
    ("GET", "/livez"),
]


@pytest.mark.parametrize(("method", "path"), NOT_THE_HOOK, ids=[f"{m} {p}" for m, p in NOT_THE_HOOK])
async def test_the_hook_listener_answers_404_to_anything_but_the_hook(
    client: httpx.AsyncClient, records: Records, method: str, path: str
) -> None:
    answer = await client.request(method, path, json=push(), headers={"host": "evil.example"})
    assert answer.status_code == 404, answer.text
    assert "location" not in answer.headers
    assert "evil.example" not in answer.text
    assert records.recent() == []


async def test_wrong_tokens_log_one_line_with_a_count(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "webhook.app")
    for i in range(200):
        assert (await client.post(f"/hooks/dockerhub/wrong{i}", json=push())).status_code == 404
    lines = [r for r in caplog.records if r.getMessage() == "hook refused: wrong token"]
    assert len(lines) == 1
    # The next line after the interval says how many were not logged.
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)
    assert (await client.post("/hooks/dockerhub/wrong", json=push())).status_code == 404
    lines = [r for r in caplog.records if r.getMessage() == "hook refused: wrong token"]
    assert len(lines) == 2
    assert lines[1].suppressed == 199  # type: ignore[attr-defined]


@pytest.mark.parametrize(("case", "body", "status", "says"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_bodies_get_a_clear_400(
    metrics: MetricDelta,
    client: httpx.AsyncClient,
    records: Records,
    case: str,
    body: bytes,
    status: int,
    says: str,
) -> None:
    answer = await client.post(HOOK, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert says in answer.json()["detail"]
    await assert_no_deploys(metrics, records)


@pytest.mark.parametrize(("case", "payload", "field"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
async def test_bad_fields_get_a_400_naming_the_field(
    metrics: MetricDelta,
    client: httpx.AsyncClient,
    records: Records,
    case: str,
    payload: dict[str, Any],
    field: str,
) -> None:
    answer = await client.post(HOOK, json=payload)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"{field}:"), answer.json()
    await assert_no_deploys(metrics, records)


@pytest.mark.parametrize(("case", "payload", "reason"), IGNORED, ids=[i[0] for i in IGNORED])
async def test_pushes_that_are_not_ours_are_ignored_with_the_reason(
    metrics: MetricDelta,
    client: httpx.AsyncClient,
    records: Records,
    case: str,
    payload: dict[str, Any],
    reason: str,
) -> None:
    answer = await client.post(HOOK, json=payload)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "ignored", answer.json()
    assert reason in answer.json()["reason"]
    await assert_no_deploys(metrics, records)


async def test_oversized_bodies_get_413_declared_or_streamed(
    metrics: MetricDelta, client: httpx.AsyncClient, records: Records
) -> None:
    assert (await client.post(HOOK, content=BIG)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(BIG), 4096):
            yield BIG[i : i + 4096]

    answer = await client.post(HOOK, content=chunks())
    assert answer.status_code == 413
    assert "65536" in answer.json()["detail"]
    await assert_no_deploys(metrics, records)


async def test_replaying_docker_hubs_documented_example_deploys_nothing(
    metrics: MetricDelta, client: httpx.AsyncClient, records: Records
) -> None:
    example = DOCS_PAYLOAD.read_bytes()
    for _ in range(3):
        answer = await client.post(HOOK, content=example)
        assert answer.status_code == 202
        assert answer.json()["status"] == "ignored"
    await assert_no_deploys(metrics, records)


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


async def test_deployments_need_the_bearer_token(admin: httpx.AsyncClient) -> None:
    for path in ("/deployments", "/deployments/1"):
        assert (await admin.get(path)).status_code == 401
        assert (await admin.get(path, headers={"authorization": f"Bearer {TOKEN}x"})).status_code == 401
        assert (await admin.get(path, headers={"authorization": f"Basic {TOKEN}"})).status_code == 401
    assert (await admin.post("/deploy")).status_code == 401
    ok = await admin.get("/deployments", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ok.json() == []


#: Headers cloudflared forwards with every request (Cloudflare's edge adds them); one is enough to refuse.
TUNNEL_FORWARDED = [
    {"cf-connecting-ip": "203.0.113.7", "cf-ray": "8f1e2d3c4b5a6978-FRA", "cdn-loop": "cloudflare",
     "x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https", "cf-visitor": '{"scheme":"https"}'},
    {"Cf-Connecting-Ip": "203.0.113.7"},
    {"cf-ray": "8f1e2d3c4b5a6978-FRA"},
    {"x-forwarded-for": "203.0.113.7"},
]  # fmt: skip
LOCAL_ONLY = ["/metrics", "/docs", "/openapi.json", "/livez", "/deployments"]


@pytest.mark.parametrize("path", LOCAL_ONLY)
async def test_local_only_routes_refuse_what_the_tunnel_forwards(admin: httpx.AsyncClient, path: str) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    local = await admin.get(path, headers=auth)
    assert local.status_code == 200, local.text
    for headers in TUNNEL_FORWARDED:
        forwarded = await admin.get(path, headers=auth | headers)
        assert forwarded.status_code == 404, (headers, forwarded.text)
        assert forwarded.json() == {"detail": "Not Found"}
    refused = await admin.post("/deploy", headers=auth | TUNNEL_FORWARDED[1])
    assert refused.status_code == 404


async def test_before_the_clock_is_synced_no_push_is_refused_for_its_age(
    client: httpx.AsyncClient, records: Records, clock: FakeClock
) -> None:
    """A Pi without its NTP time may be days off: a real push must not be called stale or future."""
    clock.synced = False
    clock.now = datetime(2024, 1, 1, tzinfo=UTC).timestamp()  # a Pi back from a long power cut
    answer = await client.post(HOOK, json=push(pushed_at=time.time()))
    assert answer.json()["status"] == "accepted", answer.json()
    (queued,) = records.recent()
    assert queued.clock_unsynced
    assert (await client.post(HOOK, json=push(pushed_at=queued.trigger_pushed_at))).json()[
        "reason"
    ] == REPLAYED
    clock.synced = True  # once synced, the age counts again
    assert "future" in (await client.post(HOOK, json=push(pushed_at=time.time() + 1))).json()["reason"]


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


REPO_REF = "127.0.0.1:5000/cryptopi/appliance"


def image(n: int) -> ImageInfo:
    digest = f"sha256:{n:064x}"
    return ImageInfo(f"sha256:id{n}", digest, f"v{n}", f"{REPO_REF}@{digest}")


class ScriptedDocker:
    """The Docker side of a deploy, scripted: what runs, what a pull brings, which step breaks and how."""

    def __init__(self, breaks: dict[str, Exception] | None = None, pulled: int = 2) -> None:
        self.breaks = breaks or {}
        self.images = {1: image(1)}
        self.runs: ImageInfo | None = image(1)
        self.pulled = image(pulled)
        self.pin: str | None = image(1).pinned
        self.calls: list[str] = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.breaks:
            raise self.breaks.pop(name)

    def image_reference(self) -> str:
        return f"{REPO_REF}:latest"

    def pull(self, reference: str) -> ImageInfo:
        self._step("pull")
        return self.pulled

    def running(self, repository: str) -> ImageInfo | None:
        return self.runs

    def recreate(self, pinned: str) -> None:
        self._step(f"recreate {pinned.rpartition(':')[2].lstrip('0')}")
        self.runs = next(i for i in (image(1), self.pulled) if i.pinned == pinned)

    def wait_healthy(self, timeout_s: float) -> None:
        self._step("wait_healthy")

    def read_pin(self) -> str | None:
        return self.pin

    def write_pin(self, pinned: str) -> None:
        self.calls.append(f"pin {pinned.rpartition(':')[2].lstrip('0')}")
        self.pin = pinned

    def prune(self, repository: str, keep: set[str]) -> tuple[int, int]:
        self.calls.append(f"prune keeping {sorted(keep)}")
        return 2, 140_000_000


async def run_deploys(deployer: Deployer, until: Any, what: str, timeout: float = 5) -> None:
    worker = asyncio.create_task(deployer.run())
    try:
        await wait_for(until, timeout, what)
    finally:
        worker.cancel()


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
    assert not records.failed_before("sha256:id2")  # a broken engine says nothing about the image
    # Nothing but the pin file decides what a boot starts: a failed pull leaves it alone.
    assert docker.calls[:3] == ["pull", "pull", "recreate 2"]


async def test_a_good_deploy_pins_its_digest_then_prunes(records: Records) -> None:
    docker = ScriptedDocker()
    deployer = Deployer(docker, records, 1.0, keep_images=3)
    deployer.request("latest", time.time())
    await run_deploys(deployer, lambda: records.recent()[0].state == "succeeded", "the deploy")
    assert docker.calls == ["pull", "recreate 2", "wait_healthy", "pin 2", "prune keeping ['sha256:id2']"]
    ended = records.recent()[0]
    assert (ended.trigger, ended.before_version, ended.after_version) == ("webhook", "v1", "v2")
    assert (ended.images_removed, ended.bytes_freed) == (2, 140_000_000)
    assert records.passed(3) == ["sha256:id2"]


async def test_a_failure_after_the_recreate_rolls_back_to_the_previous_digest(records: Records) -> None:
    docker = ScriptedDocker({"wait_healthy": Unhealthy("not healthy within 1 s")})
    deployer = Deployer(docker, records, 1.0)
    deployer.request("latest", time.time())
    await run_deploys(deployer, lambda: records.recent()[0].state == "rolled_back", "the rollback")
    # The pin is never the new digest: a boot during or after this deploy starts v1.
    assert docker.calls == ["pull", "recreate 2", "wait_healthy", "recreate 1", "wait_healthy"]
    assert docker.pin == image(1).pinned
    assert records.failed_before("sha256:id2")  # its own health check failed: not tried again
    assert records.digest_failed(image(2).digest or "")  # nor polled for again
    ended = records.recent()[0]
    assert ended.rolled_back
    assert ended.health_failed
    # The same image again: skipped, nothing recreated.
    docker.calls.clear()
    deployer.request("latest", time.time())
    await run_deploys(deployer, lambda: records.recent()[0].state == "skipped", "the repeat")
    assert docker.calls == ["pull"]


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@contextlib.asynccontextmanager
async def deferred_at_59(records: Records) -> AsyncIterator[tuple[FakeClock, ScriptedDocker, Deployer, int]]:
    """A deployer at 10:59 with the default quiet minutes, and a push it deferred."""
    clock = FakeClock(at("2026-12-01T10:59:00+00:00"))
    docker = ScriptedDocker()
    deployer = Deployer(docker, records, 1.0, window=DeployWindow((58, 2)), clock=clock)
    worker = asyncio.create_task(deployer.run())
    try:
        first, _ = deployer.request("latest", clock.now)
        await wait_for(lambda: records.recent()[0].state == "deferred", 5, "the deferral")
        yield clock, docker, deployer, first.id
    finally:
        worker.cancel()


async def test_a_push_at_59_is_deferred_and_deployed_at_02(records: Records) -> None:
    async with deferred_at_59(records) as (clock, docker, deployer, first):
        assert records.recent()[0].deferred_until == at("2026-12-01T11:02:00+00:00")
        _, coalesced = deployer.request("latest", clock.now + 30)  # a push meanwhile joins it
        assert coalesced
        await asyncio.sleep(0.2)
        assert docker.calls == []  # nothing pulled, nothing recreated before :02
        clock.now = at("2026-12-01T11:01:59+00:00")
        await asyncio.sleep(0.2)
        assert docker.calls == []
        clock.now = at("2026-12-01T11:02:00+00:00")
        await wait_for(lambda: records.recent()[0].state == "succeeded", 5, "the deploy at :02")
    (ended,) = records.recent()
    assert (ended.id, ended.triggers, ended.started_at) == (first, 2, at("2026-12-01T11:02:00+00:00"))


async def test_a_deploy_by_hand_with_now_ignores_the_window(records: Records) -> None:
    async with deferred_at_59(records) as (clock, docker, deployer, _):
        _, coalesced = deployer.request("(manual)", clock.now, "manual", force=True)
        assert coalesced
        await wait_for(lambda: records.recent()[0].state == "succeeded", 5, "the forced deploy")
    assert docker.calls[0] == "pull"


NIGHT = (daytime(2), daytime(5))
WINDOWS = [
    # (quiet, maintenance, zone, now, opens)
    ((58, 2), None, "UTC", "2026-12-01T10:57:59+00:00", "2026-12-01T10:57:59+00:00"),
    ((58, 2), None, "UTC", "2026-12-01T10:58:00+00:00", "2026-12-01T11:02:00+00:00"),
    ((58, 2), None, "UTC", "2026-12-01T11:01:59+00:00", "2026-12-01T11:02:00+00:00"),
    ((58, 2), None, "UTC", "2026-12-01T23:59:00+00:00", "2026-12-02T00:02:00+00:00"),
    ((10, 20), None, "UTC", "2026-12-01T10:15:00+00:00", "2026-12-01T10:20:00+00:00"),
    (None, None, "UTC", "2026-12-01T10:59:00+00:00", "2026-12-01T10:59:00+00:00"),
    # 02:00-05:00 in Berlin is 01:00-04:00 UTC in winter (00:00-03:00 in summer); its first minutes are quiet.
    ((58, 2), NIGHT, "Europe/Berlin", "2026-12-01T10:30:00+00:00", "2026-12-02T01:02:00+00:00"),
    ((58, 2), NIGHT, "Europe/Berlin", "2026-12-01T02:30:00+00:00", "2026-12-01T02:30:00+00:00"),
    ((58, 2), NIGHT, "Europe/Berlin", "2026-07-01T00:30:00+00:00", "2026-07-01T00:30:00+00:00"),
    ((58, 2), NIGHT, "Europe/Berlin", "2026-07-01T03:30:00+00:00", "2026-07-02T00:02:00+00:00"),
    # The night clocks go forward in Berlin (02:00 CET is 03:00 CEST, 01:00 UTC): the window opens then.
    ((58, 2), NIGHT, "Europe/Berlin", "2026-03-29T00:30:00+00:00", "2026-03-29T01:02:00+00:00"),
    # Quiet minutes at their edges: the first is quiet, the end is not.
    ((10, 20), None, "UTC", "2026-12-01T10:09:59+00:00", "2026-12-01T10:09:59+00:00"),
    ((10, 20), None, "UTC", "2026-12-01T10:10:00+00:00", "2026-12-01T10:20:00+00:00"),
    ((10, 20), None, "UTC", "2026-12-01T10:19:59+00:00", "2026-12-01T10:20:00+00:00"),
    ((10, 20), None, "UTC", "2026-12-01T10:20:00+00:00", "2026-12-01T10:20:00+00:00"),
    ((30, 30), None, "UTC", "2026-12-01T10:30:00+00:00", "2026-12-01T10:30:00+00:00"),  # an empty stretch
    # Quiet minutes across the hour (55-05).
    ((55, 5), None, "UTC", "2026-12-01T10:54:59+00:00", "2026-12-01T10:54:59+00:00"),
    ((55, 5), None, "UTC", "2026-12-01T10:55:00+00:00", "2026-12-01T11:05:00+00:00"),
    ((55, 5), None, "UTC", "2026-12-01T11:04:59+00:00", "2026-12-01T11:05:00+00:00"),
    ((55, 5), None, "UTC", "2026-12-01T11:05:00+00:00", "2026-12-01T11:05:00+00:00"),
    ((55, 5), None, "UTC", "2026-12-31T23:57:00+00:00", "2027-01-01T00:05:00+00:00"),
    # Maintenance hours at their edges: the start is inside, the end is not.
    (None, NIGHT, "UTC", "2026-12-01T01:59:59+00:00", "2026-12-01T02:00:00+00:00"),
    (None, NIGHT, "UTC", "2026-12-01T02:00:00+00:00", "2026-12-01T02:00:00+00:00"),
    (None, NIGHT, "UTC", "2026-12-01T04:59:59+00:00", "2026-12-01T04:59:59+00:00"),
    (None, NIGHT, "UTC", "2026-12-01T05:00:00+00:00", "2026-12-02T02:00:00+00:00"),
    # A window across midnight, and its edges.
    (None, (daytime(22), daytime(2)), "UTC", "2026-12-01T12:00:00+00:00", "2026-12-01T22:00:00+00:00"),
    (None, (daytime(22), daytime(2)), "UTC", "2026-12-01T01:00:00+00:00", "2026-12-01T01:00:00+00:00"),
    (None, (daytime(22), daytime(2)), "UTC", "2026-12-01T22:00:00+00:00", "2026-12-01T22:00:00+00:00"),
    (None, (daytime(22), daytime(2)), "UTC", "2026-12-01T01:59:59+00:00", "2026-12-01T01:59:59+00:00"),
    (None, (daytime(22), daytime(2)), "UTC", "2026-12-01T02:00:00+00:00", "2026-12-01T22:00:00+00:00"),
]  # fmt: skip


@pytest.mark.parametrize(("quiet", "maintenance", "zone", "now", "opens"), WINDOWS)
def test_deploy_windows(quiet: Any, maintenance: Any, zone: str, now: str, opens: str) -> None:
    assert DeployWindow(quiet, maintenance, zone).opens_at(at(now)) == at(opens)


def test_the_default_window_is_quiet_from_58_to_02_at_any_hour() -> None:
    window = DeployWindow()
    assert window.opens_at(at("2026-12-01T10:57:59+00:00")) == at("2026-12-01T10:57:59+00:00")
    assert window.opens_at(at("2026-12-01T10:58:00+00:00")) == at("2026-12-01T11:02:00+00:00")
    assert window.opens_at(at("2026-12-01T03:02:00+00:00")) == at("2026-12-01T03:02:00+00:00")


def test_the_timesyncd_flag_is_where_systemd_puts_it() -> None:
    """systemd-timesyncd.service(8): it touches /run/systemd/timesync/synchronized on each sync."""
    assert Path("/run/systemd/timesync/synchronized") == clock_module.TIMESYNC_FLAG


class FakeLibc:
    """adjtimex(2) as the test wants it: a clock state (TIME_OK 0 … TIME_ERROR 5, -1 on failure)."""

    def __init__(self, state: int) -> None:
        self.state = state
        self.buffers: list[int] = []

    def adjtimex(self, buf: Any) -> int:
        self.buffers.append(len(buf))
        return self.state


@pytest.mark.parametrize(
    ("state", "synced"),
    # adjtimex(2): TIME_OK 0, TIME_INS 1, TIME_DEL 2, TIME_OOP 3, TIME_WAIT 4 mean synchronised;
    # TIME_ERROR 5 means not, and -1 that the call failed (EPERM inside the unit's sandbox).
    [(0, True), (1, True), (2, True), (4, True), (5, False), (-1, False)],
)
def test_without_timesyncd_the_kernel_says_whether_the_clock_is_synced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: int, synced: bool
) -> None:
    monkeypatch.setattr(clock_module, "TIMESYNC_FLAG", tmp_path / "synchronized")
    libc = FakeLibc(state)
    monkeypatch.setattr("ctypes.CDLL", lambda *_, **__: libc)
    assert SystemClock().synchronized() is synced
    (size,) = libc.buffers
    assert size >= 208  # room for struct timex (208 bytes on 64-bit Linux)
    (tmp_path / "synchronized").touch()  # timesyncd has synced: its flag is enough
    assert SystemClock().synchronized() is True


@pytest.mark.parametrize("error", [OSError("libc not found"), AttributeError("no adjtimex")])
def test_a_clock_that_cannot_be_asked_counts_as_unsynced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception
) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise error

    monkeypatch.setattr(clock_module, "TIMESYNC_FLAG", tmp_path / "synchronized")
    monkeypatch.setattr("ctypes.CDLL", refuse)
    assert SystemClock().synchronized() is False


def test_window_settings_are_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRYPTOPI_WEBHOOK_TOKEN", TOKEN)
    monkeypatch.setenv("CRYPTOPI_WEBHOOK_REPOSITORY", REPO_NAME)
    good = load_settings(quiet_minutes="55-05", maintenance_window="02:00-05:00", timezone="Europe/Berlin")
    assert (good.quiet, good.maintenance) == ((55, 5), (daytime(2), daytime(5)))
    assert load_settings(quiet_minutes="").quiet is None
    for bad in ({"quiet_minutes": "58"}, {"maintenance_window": "2-5"}, {"maintenance_window": "02:00-02:00"},
                {"timezone": "Mars/Olympus"},
                {"admin_port": 8081}, {"notify_urls": "tgram://secret-bot-token"}):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            load_settings(**bad)
        assert exit_.value.code == 2
        out = capsys.readouterr().out
        assert f"CRYPTOPI_WEBHOOK_{next(iter(bad)).upper()}" in out or "ADMIN_PORT" in out, out
        assert "secret-bot-token" not in out


def test_records_of_an_earlier_version_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "deployments.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0])
    old.execute("INSERT INTO deployments (state, trigger_tag, trigger_pushed_at, requested_at) "
                "VALUES ('succeeded', 'latest', 1.0, 2.0)")  # fmt: skip
    old.commit()
    old.close()
    records = Records(path)
    (kept,) = records.recent()
    assert (kept.state, kept.trigger, kept.bytes_freed) == ("succeeded", "webhook", None)
    records.close()
    assert Records(path).recent() == [kept]  # opening it again changes nothing
