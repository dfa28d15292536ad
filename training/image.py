"""The appliance image of a release: its version and tags, the registry check, the build, the push.

One choice differs between machines, the builder: ``buildx`` (BuildKit: several platforms in one manifest
list, pushed as it builds, a cache such as GitHub Actions') or ``classic`` (``DOCKER_BUILDKIT=0 docker
build`` for the engine's own platform, then ``docker push`` of each tag: engines without buildx, such as
the test machines'). Tags, labels, build arguments and the digest read back are the same for both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from appliance.registry import RegistryError, Versions, latest_versions, load_version

log = logging.getLogger(__name__)
Builder = Literal["buildx", "classic"]
BUILDERS: tuple[Builder, ...] = ("buildx", "classic")
#: What the Pi runs (arm64) and what CI and a developer's machine run (amd64): buildx's default.
PLATFORMS = ("linux/amd64", "linux/arm64")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: A repository as Docker's reference grammar has it, with an optional registry host[:port] first.
REPOSITORY = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
)


class ImageError(RuntimeError):
    """A build, push or check that failed; the message says which and why."""


@dataclass(frozen=True)
class Identity:
    """What a release is called: ``<project version>-<run number>``, and the build id ``/health`` shows."""

    version: str
    commit: str

    @classmethod
    def of(cls, context: Path, run_number: int, commit: str) -> Identity:
        if not COMMIT.match(commit):
            raise ValueError(f"--commit must be a full 40-hex commit id, not {commit!r}")
        project = tomllib.loads((context / "pyproject.toml").read_text())["project"]["version"]
        return cls(f"{project}-{run_number}", commit)

    @property
    def build(self) -> str:
        return f"{self.version}+{self.commit[:12]}"

    def tags(self, repository: str, latest: bool) -> list[str]:
        """The version, the commit, ``sha-<short>``, and ``latest`` for a release of the default branch."""
        names = [self.version, self.commit, f"sha-{self.commit[:7]}", *(["latest"] if latest else [])]
        return [f"{repository}:{name}" for name in names]


@dataclass(frozen=True)
class Build:
    """One image build: what every builder is given."""

    context: Path
    tags: list[str]
    build_args: dict[str, str]
    labels: dict[str, str]
    platforms: tuple[str, ...] = PLATFORMS  # buildx only; the classic builder builds the engine's own
    cache_from: str | None = None  # buildx only, e.g. type=gha
    cache_to: str | None = None

    @property
    def repository(self) -> str:
        return self.tags[0].rpartition(":")[0]


@dataclass(frozen=True)
class Pushed:
    repository: str
    tags: list[str]
    digest: str  # of the manifest (list) every tag names
    platforms: list[str]


def labels(identity: Identity, source_url: str | None) -> dict[str, str]:
    """OCI labels beside the Dockerfile's own (title, description, licenses, version = the build id)."""
    created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    found = {
        "org.opencontainers.image.revision": identity.commit,
        "org.opencontainers.image.created": created,
    }
    return found | ({"org.opencontainers.image.source": source_url} if source_url else {})


def check_registry(models: Path) -> Versions:
    """Every version ``latest.json`` names, verified as the appliance will (files, checksums, feature
    spec): a broken registry is never baked into an image."""
    try:
        versions = latest_versions(models)
        for by_granularity in versions.values():
            for version in by_granularity.values():
                load_version(models / version)
    except RegistryError as exc:
        raise ImageError(f"the registry to ship is broken: {exc}") from None
    if not versions:
        raise ImageError(f"{models}: no latest.json, or it names no version: nothing to serve")
    return versions


def _docker(*args: str, capture: bool = False, classic: bool = False) -> str:
    """``docker ARGS``: its output streamed to stderr (the build log), or returned if ``capture``."""
    cli = shutil.which("docker")
    if cli is None:
        raise ImageError("the docker CLI is not on PATH")
    env = os.environ | ({"DOCKER_BUILDKIT": "0"} if classic else {})
    proc = subprocess.run([cli, *args], env=env, stdin=subprocess.DEVNULL, text=True,
                          stdout=subprocess.PIPE if capture else sys.stderr,
                          stderr=subprocess.PIPE if capture else sys.stderr)  # fmt: skip
    if proc.returncode != 0:
        detail = f":\n{proc.stderr.strip()}" if capture else " (its output is above)"
        raise ImageError(f"docker {' '.join(args[:2])} exited {proc.returncode}{detail}")
    return proc.stdout if capture else ""


def _common(build: Build) -> list[str]:
    args = ["--file", str(build.context / "Dockerfile")]
    for tag in build.tags:
        args += ["--tag", tag]
    for name, value in build.build_args.items():
        args += ["--build-arg", f"{name}={value}"]
    for name, value in build.labels.items():
        args += ["--label", f"{name}={value}"]
    return args


def build_and_push(builder: Builder, build: Build, work: Path) -> Pushed:
    """Build ``build`` with ``builder`` and push every tag; the digest is read back from the builder."""
    log.info("building the image", extra={"builder": builder, "tags": len(build.tags),
                                          "repository": build.repository})  # fmt: skip
    if builder == "buildx":
        work.mkdir(parents=True, exist_ok=True)
        metadata = work / "buildx-metadata.json"
        cache = [*(["--cache-from", build.cache_from] if build.cache_from else []),
                 *(["--cache-to", build.cache_to] if build.cache_to else [])]  # fmt: skip
        _docker("buildx", "build", "--platform", ",".join(build.platforms), "--push",
                "--metadata-file", str(metadata), *cache, *_common(build), str(build.context))  # fmt: skip
        digest = str(json.loads(metadata.read_text())["containerimage.digest"])
        return Pushed(build.repository, build.tags, digest, list(build.platforms))
    if build.cache_from or build.cache_to:
        raise ImageError("the classic builder has no --cache-from/--cache-to (BuildKit's): use buildx")
    # Host networking for RUN steps: an engine without a bridge (the test machines') has no other.
    _docker("build", "--network=host", *_common(build), str(build.context), classic=True)
    for tag in build.tags:
        log.info("pushing", extra={"tag": tag})
        _docker("push", tag, capture=True)
    inspected = json.loads(_docker("image", "inspect", build.tags[0], capture=True))[0]
    digests = {
        d.partition("@")[2] for d in inspected["RepoDigests"] if d.partition("@")[0] == build.repository
    }
    if len(digests) != 1:
        raise ImageError(f"{build.repository}: expected one pushed digest, the engine has {sorted(digests)}")
    return Pushed(
        build.repository, build.tags, digests.pop(), [f"{inspected['Os']}/{inspected['Architecture']}"]
    )
