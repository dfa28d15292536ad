"""``make smoke-arm64``: the image for the Raspberry Pi (linux/arm64), built and run here under QEMU.

``python -m tests.smoke_arm64`` (as root) registers QEMU's aarch64 binfmt handler if it is missing, starts a
private engine, makes the amd64 and arm64 debootstrap bases, builds the repository's Dockerfile for both with
the classic builder (the arm64 RUN steps execute under QEMU), then runs both images against one replay
server and checks that they serve the same predictions: the same ``as_of`` and ``predicted_close`` within
``--tolerance`` (relative; an int8 graph's within ``INT8_TOLERANCE``, its integer kernels being each CPU's).
Everything it registered or started is undone at exit. Prints each phase's time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from appliance.registry import load_version
from tests.conftest import LIVE_MARKET_ARGS, REPO, free_port, replay_process
from tests.dockerenv import (
    DockerError,
    appliance_env,
    base_image,
    build_image,
    container,
    container_logs,
    docker,
    docker_engine,
    image_size,
    inspect,
    pi4_emulation,
    qemu_binfmt,
    wait_healthy,
)

ARCHES = ("amd64", "arm64")
PRODUCTS = ("BTC-USD", "ETH-USD")
MODELS = ("cnn", "lasso", "persistence")
#: How far apart (relative) the two architectures' predicted closes may be, for float graphs.
TOLERANCE = 1e-6
#: ... and for an int8 graph (the CNN): its integer kernels are each CPU's own (an x86 without VNNI
#: saturates u8 x s8 pairs; seen: 2.9e-6 between an AVX2-only x86 and arm64), a fiftieth of the CNN's
#: typical hourly error at most.
INT8_TOLERANCE = 5e-5


def int8(version: str, model: str) -> bool:
    """Whether the shipped version serves ``model`` from an int8 graph (its manifest says so)."""
    return load_version(REPO / "appliance" / "models" / version).models[model].int8


class Phases:
    """Wall time of each named phase, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"-- {name} …", flush=True)
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - start
            print(f"-- {name}: {self.seconds[name]:.1f}s", flush=True)

    def report(self) -> None:
        print("\nphase                          seconds")
        for name, seconds in self.seconds.items():
            print(f"{name:30} {seconds:7.1f}")
        print(f"{'total':30} {time.monotonic() - self.start:7.1f}")


def predict(url: str, product: str, model: str, at: str | None = None) -> dict[str, Any] | None:
    params = {"product": product, "model": model} | ({"at": at} if at else {})
    r = httpx.get(f"{url}/api/predict", params=params, timeout=10)
    if r.status_code in (503, 404):
        return None
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


def wait_prediction(url: str, product: str, model: str, at: str | None, timeout: float) -> dict[str, Any]:
    """The prediction in force at ``at`` (the newest if None); with ``at``, it must be made *at* ``at``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predict(url, product, model, at)
        if got is not None and (at is None or got["as_of"] == at):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: no {product} {model} prediction as of {at or 'now'}: {got}")
        time.sleep(0.5)


def compare(urls: dict[str, str], timeout: float, tolerance: float, failures: list[str]) -> float:
    """Both appliances' predictions of one hour, per product and model; returns the largest difference."""
    worst = 0.0
    print(f"   {'product':8} {'model':6} {'as_of':21} {'amd64':>16} {'arm64':>16} {'rel diff':>9}")
    for product in PRODUCTS:
        for model in MODELS:
            newest = [wait_prediction(urls[arch], product, model, None, timeout) for arch in ARCHES]
            as_of = max(p["as_of"] for p in newest)  # the later one: the other has made it too, or will
            amd, arm = (wait_prediction(urls[arch], product, model, as_of, 120) for arch in ARCHES)
            a, b = amd["predicted_close"], arm["predicted_close"]
            rel = abs(a - b) / abs(a)
            worst = max(worst, rel)
            print(f"   {product:8} {model:6} {as_of:21} {a:16.8f} {b:16.8f} {rel:9.1e}")
            if rel > (max(tolerance, INT8_TOLERANCE) if int8(amd["model_version"], model) else tolerance):
                failures.append(f"{product} {model} as of {as_of}: {a} vs {b} ({rel:.1e} relative)")
    return worst


def build_for(host: str, arch: str, work: Path, phase: Phases, failures: list[str]) -> str:
    """The repository's image for ``arch`` (``cryptopi:smoke-ARCH``) on its debootstrap base; it must run as
    that machine inside."""
    with phase(f"base image {arch}"):
        base = base_image(host, arch)
    image = f"cryptopi:smoke-{arch}"
    with phase(f"build {arch}"):
        # No --platform: the classic builder of Docker 20.10 records RUN steps' layers as the engine's
        # platform and then refuses them ("does not match the specified platform"). The arm64 base
        # alone makes the image arm64 (its RUN steps execute under QEMU).
        build_image(host, image, {"BASE": base, "BUILD": f"smoke-{arch}"}, log=work / f"build-{arch}.log")
    check_machine(host, image, arch, base, work, failures)
    return image


def run_options(arch: str, work: Path) -> list[str]:
    """The arm64 containers run under QEMU: as a Pi 4's Cortex-A72 (see pi4_emulation).

    The image's HEALTHCHECK deadlines are a Pi's: emulated (and on a loaded machine), the check's own
    Python start took longer than its 5 s timeout while the appliance was serving, so they are widened.
    """
    if arch != "arm64":
        return []
    return [*pi4_emulation(work), "--health-timeout=30s", "--health-start-period=300s"]


def check_machine(host: str, image: str, arch: str, base: str, work: Path, failures: list[str]) -> None:
    config = inspect(host, "image", image)
    probe = "import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)"
    machine = docker(host, "run", "--rm", *run_options(arch, work), "--entrypoint", "python", image,
                     "-c", probe).stdout.strip()  # fmt: skip
    runtime_mb = (image_size(host, image) - image_size(host, base)) / 1e6
    platform = f"{config['Os']}/{config['Architecture']}"
    print(f"   {image}: {platform}, runtime layers {runtime_mb:.1f} MB,"
          f" inside: {machine} (machine, onnxruntime)")  # fmt: skip
    # The classic builder labels every image with the engine's platform (buildx labels it right).
    if machine.split()[0] != {"amd64": "x86_64", "arm64": "aarch64"}[arch]:
        failures.append(f"{image} runs as {machine}, not {arch}")


def serve_both(
    host: str, images: dict[str, str], work: Path, phase: Phases, timeout: float, tolerance: float,
    failures: list[str],
) -> float:  # fmt: skip
    """Both images against one replay server: healthy, then the same predictions (the largest relative
    difference is returned; what differs, or fails, is added to ``failures``)."""
    worst = 0.0
    with replay_process(LIVE_MARKET_ARGS) as replay_port, contextlib.ExitStack() as stack:
        urls, cids, started = {}, {}, {}
        for arch in ARCHES:
            port = free_port()
            urls[arch] = f"http://127.0.0.1:{port}"
            run = container(host, images[arch], env=appliance_env(port, replay_port),
                            options=run_options(arch, work))  # fmt: skip
            cids[arch] = stack.enter_context(run)
            started[arch] = time.monotonic()
        try:
            with phase("both healthy"):
                for arch in ARCHES:
                    wait_healthy(host, cids[arch], timeout=timeout)
                    print(f"   {arch} healthy {time.monotonic() - started[arch]:.1f}s after its start")
            with phase("same predictions"):
                worst = compare(urls, timeout, tolerance, failures)
        except (AssertionError, DockerError, httpx.HTTPError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            for arch in ARCHES:
                print(f"--- {arch} container log:\n{container_logs(host, cids[arch])}", file=sys.stderr)
    print(f"predicted_close amd64 vs arm64, largest relative difference: {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.smoke_arm64", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"relative predicted_close difference (an int8 graph's: at least {INT8_TOLERANCE})",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the arm64 container to serve")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("smoke-arm64 starts dockerd, debootstrap and binfmt_misc: run it as root", file=sys.stderr)
        return 2

    phase = Phases()
    failures: list[str] = []
    with (
        qemu_binfmt("aarch64"),
        tempfile.TemporaryDirectory(prefix="cryptopi-arm64-") as work,
        docker_engine(Path(work) / "engine") as host,
    ):
        images = {arch: build_for(host, arch, Path(work), phase, failures) for arch in ARCHES}
        serve_both(host, images, Path(work), phase, args.timeout, args.tolerance, failures)
    phase.report()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("smoke-arm64: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
