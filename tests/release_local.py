"""``make release-local``: CD's release program (``python -m training release all``), end to end, here.

Only the machine's side differs from CD's: Coinbase is the replay server (the real 15-minute candles of the
configured products and range, which also give the hourly ones exactly), Docker Hub a local
``docker-registry``, the builder the classic one on the private dockerd of the Docker tests, the image's
base the debootstrap one; the configuration is ``config/release-local.toml`` (small, a tiny CNN). The
release trains into a scratch copy of the checkout, so the repository's own registry is left alone. Then
what a Pi would get is checked: every tag in the registry names the digest the release reported, and the
image pulled afresh by that digest holds the registry the release reported and serves its hourly versions
against a replayed market. ``python -m tests.release_local`` (as root) prints each phase's time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.registry import ANY_PRODUCT
from tests.conftest import DATASETS, ETH_1H, LIVE_MARKET_ARGS, REPO, free_port, replay_process
from tests.dockerenv import (
    DockerError,
    appliance_env,
    base_image,
    container,
    container_logs,
    docker,
    docker_engine,
    docker_env,
    local_registry,
    wait_healthy,
)
from tests.smoke_arm64 import Phases
from training.release import ReleaseConfig, load_config

CONFIG = REPO / "config" / "release-local.toml"
REPOSITORY = "cryptopi/appliance"
#: What the registry answers a manifest request with: Docker's and OCI's single and multi-platform types.
MANIFEST_TYPES = ", ".join(
    f"application/vnd.{t}+json"
    for t in ("docker.distribution.manifest.v2", "docker.distribution.manifest.list.v2",
              "oci.image.manifest.v1", "oci.image.index.v1")
)  # fmt: skip
#: The registry as the image's appliance sees it, printed from inside the image.
REGISTRY_PROBE = (
    "import json; from appliance.registry import latest_versions; from appliance.settings import MODELS_DIR;"
    "versions = latest_versions(MODELS_DIR);"
    "print(json.dumps({p: {str(g): v for g, v in by.items()} for p, by in versions.items()}))"
)


def copy_checkout(dest: Path) -> Path:
    """The working tree as git sees it (tracked and new files, nothing ignored) copied to ``dest``."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def coinbase_args(cfg: ReleaseConfig) -> list[str]:
    """The replay server's arguments: the configured products' real 15-minute candles over the configured
    range, all of them already traded (REST knows them), none after."""
    if cfg.history_end is None:
        raise ValueError("a local release needs a fixed history_end: the replay has no 'now'")
    candles = [a for p in cfg.products for a in ("--candles", f"{p}={DATASETS / f'coinbase_{p}_15m.csv'}")]
    return [*candles, "--from", str(cfg.history_start), "--to", str(cfg.history_end),
            "--start-at", str(cfg.history_end)]  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """Where a local release runs: the engine, the registry, the image's base."""

    host: str
    registry: str  # 127.0.0.1:PORT
    base: str

    def repository(self, name: str = REPOSITORY) -> str:
        return f"{self.registry}/{name}"


@dataclass(frozen=True)
class Outcome:
    status: int
    report: dict[str, Any]  # release.json ({} if it wrote none)
    context: Path
    work: Path
    output: str  # the release's stdout and stderr


def release(
    machine: Machine, folder: Path, config: Path = CONFIG, stage: str = "all", run_number: int = 1,
    repository: str = REPOSITORY, echo: bool = False,
) -> Outcome:  # fmt: skip
    """``python -m training release STAGE`` as CD runs it, on a fresh copy of the checkout in ``folder``,
    against a replay server serving what ``config`` asks for."""
    cfg = load_config(config)
    context, work = copy_checkout(folder / "checkout"), folder / "work"
    with replay_process(coinbase_args(cfg)) as port:
        argv = [sys.executable, "-m", "training", "release", stage, "--config", str(config),
                "--context", str(context), "--work", str(work), "--coinbase-url", f"http://127.0.0.1:{port}",
                "--image", machine.repository(repository), "--builder", "classic",
                "--build-arg", f"BASE={machine.base}", "--run-number", str(run_number),
                "--commit", commit()]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=REPO, env=docker_env(machine.host), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        status = proc.wait()
    report_file = work / "release.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return Outcome(status, report, context, work, "".join(lines))


def registry_tags(registry: str, repository: str = REPOSITORY) -> list[str]:
    """The repository's tags in the registry; [] if it has none (the registry does not know it)."""
    r = httpx.get(f"http://{registry}/v2/{repository}/tags/list", timeout=10)
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return sorted(r.json()["tags"] or [])


def registry_digest(registry: str, repository: str, tag: str) -> str:
    r = httpx.head(f"http://{registry}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES},
                   timeout=10)  # fmt: skip
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]


@dataclass(frozen=True)
class Served:
    registry: dict[str, dict[str, str]]  # latest.json inside the image: product -> granularity -> version
    build: str  # /health's
    versions: dict[str, str]  # product -> the version /health says serves it
    predictions: dict[str, dict[str, Any]]  # product -> its newest cnn prediction


#: The product the image's pooled set (registry product '*') is checked on: ETH-USD's real candles
#: under a name with no version of its own.
UNSEEN = "SOL-USD"
MARKET = [*LIVE_MARKET_ARGS, "--candles", f"{UNSEEN}={ETH_1H}"]


def served_as(product: str) -> str:
    """The product a registry entry is seen serving: itself, or for the pooled set the unseen one."""
    return UNSEEN if product == ANY_PRODUCT else product


@contextlib.contextmanager
def pulled(machine: Machine, image: dict[str, Any]) -> Iterator[str]:
    """The pushed image, by digest, pulled afresh (its local tags removed first); removed again at exit."""
    docker(machine.host, "rmi", *image["tags"])
    ref = f"{image['repository']}@{image['digest']}"
    docker(machine.host, "pull", ref)
    try:
        yield ref
    finally:
        docker(machine.host, "rmi", ref, check=False)


def serve(machine: Machine, image: dict[str, Any], timeout: float = 180) -> Served:
    """What a Pi would run: the pushed image by digest against a replayed market, until every product has
    a prediction from the version its registry names."""
    with pulled(machine, image) as ref:
        probe = docker(machine.host, "run", "--rm", "--entrypoint", "python", ref, "-c", REGISTRY_PROBE)
        registry = json.loads(probe.stdout)
        http_port = free_port()
        url = f"http://127.0.0.1:{http_port}"
        products = {"CRYPTOPI_PRODUCTS": ",".join(served_as(p) for p in registry)}
        with (
            replay_process(MARKET) as replay_port,
            container(machine.host, ref, env=appliance_env(http_port, replay_port) | products) as cid,
        ):
            try:
                wait_healthy(machine.host, cid, timeout=timeout)
                predictions = {}
                for product in registry:
                    seen = served_as(product)
                    predictions[seen] = wait_for_version(url, seen, registry[product]["3600"], timeout)
                health = httpx.get(f"{url}/health", timeout=10).json()
            except (AssertionError, DockerError, httpx.HTTPError) as exc:
                raise AssertionError(
                    f"{exc}\n--- container log:\n{container_logs(machine.host, cid)}"
                ) from None
    versions = {p: h["model_version"] for p, h in health["products"].items()}
    return Served(registry, health["build"], versions, predictions)


def wait_for_version(url: str, product: str, version: str, timeout: float) -> dict[str, Any]:
    """The newest cnn prediction of ``product``, once it is made by ``version``."""
    deadline = time.monotonic() + timeout
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/api/predict", params={"product": product, "model": "cnn"}, timeout=10)
        if r.status_code == 200 and (got := r.json())["model_version"] == version:
            return got
        time.sleep(0.5)
    raise AssertionError(f"no {product} prediction by {version} within {timeout}s; last: {got}")


@contextlib.contextmanager
def machine(root: Path) -> Iterator[Machine]:
    """A private engine with the debootstrap base in it, and a local registry."""
    with docker_engine(root / "engine") as host, local_registry(root / "registry") as registry:
        yield Machine(host, registry, base_image(host))


def check_pushed(machine: Machine, image: dict[str, Any]) -> list[str]:
    """What is wrong with the push the release reported: a tag missing in the registry, or naming
    another digest."""
    repository = image["repository"].removeprefix(f"{machine.registry}/")
    present = registry_tags(machine.registry, repository)
    failures = []
    for tag in (t.rpartition(":")[2] for t in image["tags"]):
        if tag not in present:
            failures.append(f"{repository}:{tag} is not in the registry (it has {present})")
        elif (digest := registry_digest(machine.registry, repository, tag)) != image["digest"]:
            failures.append(f"{repository}:{tag} is {digest}, the release reported {image['digest']}")
    return failures


def check_served(served: Served, image: dict[str, Any]) -> list[str]:
    """What is wrong with what the pulled image served, against what the release reported."""
    failures = []
    if served.registry != image["serves"]:
        failures.append(
            f"the image's latest.json is {served.registry}, the release reported {image['serves']}"
        )
    if served.build != image["build"]:
        failures.append(f"/health says build {served.build}, the release built {image['build']}")
    for product, by_granularity in image["serves"].items():
        seen = served_as(product)
        if served.versions.get(seen) != by_granularity["3600"]:
            failures.append(f"{seen} is served by {served.versions.get(seen)}, not {by_granularity['3600']}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.release_local", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="what to train (with a fixed history_end)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("release-local starts dockerd and a registry and debootstraps a base: run it as root",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        coinbase_args(load_config(args.config))
    except ValueError as exc:  # ConfigRejected among them: said before anything starts
        print(f"invalid release configuration: {exc}", file=sys.stderr)
        return 2
    phase = Phases()
    with tempfile.TemporaryDirectory(prefix="cryptopi-release-") as tmp, contextlib.ExitStack() as stack:
        with phase("engine, registry, base image"):
            here = stack.enter_context(machine(Path(tmp)))
        with phase("python -m training release all"):
            outcome = release(here, Path(tmp), args.config, echo=True)
        if outcome.status != 0:
            print(f"release-local: the release exited {outcome.status}", file=sys.stderr)
            return outcome.status
        image = outcome.report["image"]
        with phase("tags and digest in the registry"):
            failures = check_pushed(here, image)
        with phase("the pushed image serves"):
            served = serve(here, image)
            failures += check_served(served, image)
        for product, prediction in served.predictions.items():
            print(f"   {product}: {prediction['model_version']} predicts {prediction['predicted_close']:.2f}"
                  f" as of {prediction['as_of']}")  # fmt: skip
    phase.report()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"release-local: OK, {image['repository']}@{image['digest']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
