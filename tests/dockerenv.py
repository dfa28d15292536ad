"""A Docker test environment that needs no internet image and no host network changes.

The recipes of the project's test machines (Debian 12, root): a private ``dockerd`` with no bridge and no
iptables rules (every container uses host networking and binds 127.0.0.1), a ``docker-registry`` on a
loopback port, a Python 3.11 base image made with ``debootstrap`` (Docker Hub is out of reach), images built
with the classic builder (there is no buildx here), and QEMU's binfmt handler for arm64 images.

Plain context managers and functions, so that the image tests, the deploy webhook's end-to-end test, the
release's, ``python -m tests.smoke_arm64`` and ``python -m tests.release_local`` share them. The ``docker``
CLI does the work (a 28.x client drives the 20.10 engine fine); the Engine API is read over its unix
socket with httpx.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

# A module, not names: tests/conftest.py may import this file's fixtures while it is itself being imported.
from tests import conftest

#: Where the debootstrap root file systems are kept between runs (a clean CI machine makes one per run).
CACHE = Path(os.environ.get("CRYPTOPI_TEST_CACHE", Path.home() / ".cache" / "cryptopi-test"))
DEBIAN_MIRROR = os.environ.get("CRYPTOPI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
#: What the Dockerfile needs of its base: python3 with venv (pip only for the build stage's uv).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
BASE_TAG = "localbase/python:3.11-bookworm"
#: This machine's trust store (a TLS-inspecting proxy's CA is in it): builds inside the image need it.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_PIP_CONF = Path("/etc/pip.conf")
#: The Engine API version spoken over the socket (Docker 20.10 is 1.41).
API = "v1.41"


class DockerError(RuntimeError):
    """A docker command or engine that failed; the message carries its output."""


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def docker_env(docker_host: str) -> dict[str, str]:
    """The environment for the ``docker`` CLI on this engine, with the classic builder."""
    return os.environ | {"DOCKER_HOST": docker_host, "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}


def docker(
    docker_host: str,
    *args: str,
    check: bool = True,
    stdin: IO[bytes] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS`` against ``docker_host``; raise DockerError with its output if it fails."""
    cli = shutil.which("docker") or "docker"
    proc = subprocess.run(
        [cli, *args],
        env=docker_env(docker_host),
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        output = _tail(proc.stdout + proc.stderr)
        raise DockerError(f"docker {' '.join(args[:3])} … exited {proc.returncode}:\n{output}")
    return proc


def _socket_path(docker_host: str) -> str:
    if not docker_host.startswith("unix://"):
        raise ValueError(f"expected a unix:// DOCKER_HOST, got {docker_host!r}")
    return docker_host.removeprefix("unix://")


def engine_api(docker_host: str, timeout: float = 10) -> httpx.Client:
    """An httpx client for the Engine API at ``docker_host`` (paths like ``/containers/ID/json``)."""
    transport = httpx.HTTPTransport(uds=_socket_path(docker_host))
    return httpx.Client(transport=transport, base_url=f"http://docker/{API}", timeout=timeout)


def inspect(docker_host: str, kind: str, ref: str) -> dict[str, Any]:
    """``GET /{kind}s/{ref}/json`` (kind: "image" or "container"); raises KeyError if there is none."""
    with engine_api(docker_host) as api:
        r = api.get(f"/{kind}s/{ref}/json")
    if r.status_code == 404:
        raise KeyError(ref)
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


def image_size(docker_host: str, ref: str) -> int:
    """The image's whole size in bytes (its base's layers included)."""
    return int(inspect(docker_host, "image", ref)["Size"])


# -- the engine ---------------------------------------------------------------------------------------------


def _pids_mentioning(paths: Sequence[Path]) -> list[int]:
    """Processes whose command line names one of ``paths`` (an engine's containerd and shims)."""
    needles = [str(p).encode() + end for p in paths for end in (b"/", b"\0")]  # whole path components
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


def _mounts_under(roots: Sequence[Path]) -> list[str]:
    points = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].encode().decode("unicode_escape")  # "\040" is a space
            if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(*roots: Path) -> None:
    """Lazily unmount what is still mounted below ``roots`` (a killed engine's overlays, a chroot's /proc)."""
    for point in _mounts_under(roots):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def _wait_serving(
    proc: subprocess.Popen[bytes], name: str, answers: Callable[[], bool], timeout: float, log_path: Path
) -> None:
    """Until ``answers()`` (a refused connection: not yet); DockerError with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DockerError(f"{name} exited {proc.returncode}:\n{_tail(log_path.read_text())}")
        with contextlib.suppress(httpx.TransportError):
            if answers():
                return
        if time.monotonic() > deadline:
            raise DockerError(f"{name} did not answer in {timeout}s:\n{_tail(log_path.read_text())}")
        time.sleep(0.05)


@contextlib.contextmanager
def docker_engine(root: Path, timeout: float = 60) -> Iterator[str]:
    """A private ``dockerd`` with its data under ``root``: no bridge, no iptables; yields its DOCKER_HOST.

    At exit its containers are removed, the engine is stopped by its pid, then any of its containerd or
    shim processes left behind are killed and its mounts undone.
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    # A unix socket path has at most 107 bytes, and containerd puts its sockets below the exec root.
    run_dir = root if len(str(root)) <= 48 else Path(tempfile.mkdtemp(prefix="cpd-", dir="/tmp"))
    data, exec_root, sock = root / "data", run_dir / "exec", run_dir / "docker.sock"
    docker_host = f"unix://{sock}"
    log_path = root / "dockerd.log"
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [dockerd, "--data-root", str(data), "--exec-root", str(exec_root), "-H", docker_host,
             "--pidfile", str(run_dir / "docker.pid"), "--bridge=none", "--iptables=false",
             "--ip6tables=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:

        def pings() -> bool:
            with engine_api(docker_host, timeout=2) as api:
                return api.get("/_ping").status_code == 200

        _wait_serving(proc, "dockerd", pings, timeout, log_path)
        yield docker_host
    finally:
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = docker(docker_host, "ps", "--all", "--quiet", timeout=30).stdout.split()
                if ids:
                    docker(docker_host, "rm", "--force", "--volumes", *ids, check=False, timeout=60)
            conftest.stop(proc, 30)
        for pid in _pids_mentioning([data, exec_root]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(root, run_dir)
        if run_dir != root:
            shutil.rmtree(run_dir, ignore_errors=True)


# -- a registry ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_registry(root: Path, timeout: float = 30) -> Iterator[str]:
    """``docker-registry`` (distribution 2.x) on a free loopback port; yields ``"127.0.0.1:PORT"``.

    The engine treats 127.0.0.0/8 registries as insecure, so ``docker push 127.0.0.1:PORT/ns/app:tag``
    works without TLS.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = conftest.free_port()
    storage = root / "registry-storage"
    storage.mkdir(exist_ok=True)
    config = root / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {json.dumps(str(storage))}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    log_path = root / "registry.log"
    registry = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([registry, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:

        def answers() -> bool:
            return httpx.get(f"http://{address}/v2/", timeout=2).status_code == 200

        _wait_serving(proc, "docker-registry", answers, timeout, log_path)
        yield address
    finally:
        conftest.stop(proc)


# -- the base image -----------------------------------------------------------------------------------------


def clean_pip_conf(text: str) -> str:
    """``/etc/pip.conf`` without its ``find-links`` and ``extra-index-url`` (host paths and mirrors)."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if skipping and line[:1] in (" ", "\t") and line.strip():
            continue  # a continuation line of the dropped value
        key = line.split("=", 1)[0].strip().lower().replace("_", "-")
        skipping = "=" in line and key in ("find-links", "extra-index-url")
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _host_files() -> dict[str, bytes]:
    """The files of this machine that go into the base image: its CA bundle and its cleaned pip.conf."""
    files = {}
    if HOST_CA_BUNDLE.is_file():
        files["etc/ssl/certs/ca-certificates.crt"] = HOST_CA_BUNDLE.read_bytes()
    if HOST_PIP_CONF.is_file():
        files["etc/pip.conf"] = clean_pip_conf(HOST_PIP_CONF.read_text()).encode()
    return files


def base_rootfs(arch: str = "amd64") -> Path:
    """A tarball of a minimal Debian bookworm with Python 3.11 for ``arch``, made by debootstrap once.

    Cached under ``CACHE`` by a key of everything that goes into it (arch, packages, mirror, this
    machine's CA bundle and pip.conf); an arch other than the host's needs QEMU's binfmt handler
    (``qemu_binfmt``). About 45 s for amd64, 300 MB.
    """
    files = _host_files()
    recipe = json.dumps([SUITE, arch, BASE_PACKAGES, DEBIAN_MIRROR, sorted(files)]).encode()
    key = hashlib.sha256(recipe + b"".join(files[k] for k in sorted(files))).hexdigest()[:12]
    tarball = CACHE / f"rootfs-{SUITE}-{arch}-{key}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".rootfs-{arch}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be making the same one
        if tarball.is_file():
            return tarball
        work = Path(tempfile.mkdtemp(prefix=f"rootfs-{arch}-", dir=CACHE))
        try:
            rootfs = work / "rootfs"
            debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
            proc = subprocess.run(
                [debootstrap, f"--arch={arch}", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(rootfs), DEBIAN_MIRROR],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800,
            )  # fmt: skip
            if proc.returncode != 0:
                log = rootfs / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace") if log.is_file() else proc.stdout + proc.stderr
                raise DockerError(f"debootstrap --arch={arch} exited {proc.returncode}:\n{_tail(detail)}")
            for name, content in files.items():
                (rootfs / name).write_bytes(content)
            for leftover in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
                (rootfs / leftover).unlink(missing_ok=True)
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                           check=True)  # fmt: skip
            for old in CACHE.glob(f"rootfs-{SUITE}-{arch}-*.tar"):
                old.unlink()
            partial.rename(tarball)
        finally:
            unmount_under(work)  # debootstrap's /proc and /sys, should it have stopped half-way
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def base_image(docker_host: str, arch: str = "amd64") -> str:
    """``localbase/python:3.11-bookworm`` (``…-arm64`` for arm64) in the engine, made from ``base_rootfs``.

    The Dockerfile builds on it with ``--build-arg BASE=<this tag>``.
    """
    tag = BASE_TAG if arch == "amd64" else f"{BASE_TAG}-{arch}"
    tarball = base_rootfs(arch)
    with contextlib.suppress(KeyError):
        labels = inspect(docker_host, "image", tag)["Config"].get("Labels") or {}
        if labels.get("cryptopi.rootfs") == tarball.name:
            return tag
    with tarball.open("rb") as stream:
        docker(docker_host, "import", "--platform", f"linux/{arch}",
               "--change", "ENV LANG=C.UTF-8", "--change", f"LABEL cryptopi.rootfs={tarball.name}",
               "--change", 'CMD ["python3"]', "-", tag, stdin=stream)  # fmt: skip
    return tag


# -- builds and containers ----------------------------------------------------------------------------------


def build_image(
    docker_host: str,
    tag: str,
    build_args: Mapping[str, str] | None = None,
    context: Path | None = None,
    dockerfile: Path | None = None,
    platform: str | None = None,
    log: Path | None = None,
    timeout: float = 3600,
) -> str:
    """Build ``tag`` with the classic builder and host networking; returns the image id.

    ``context`` defaults to the repository (and ``dockerfile`` to its Dockerfile). The whole build output
    goes to ``log`` if given (and into the error if the build fails).
    """
    context = context or conftest.REPO
    args = ["build", "--network=host", "--tag", tag, "--file", str(dockerfile or context / "Dockerfile")]
    if platform:
        args += ["--platform", platform]
    for name, value in (build_args or {}).items():
        args += ["--build-arg", f"{name}={value}"]
    proc = docker(docker_host, *args, str(context), check=False, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise DockerError(f"docker build {tag} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    return str(inspect(docker_host, "image", tag)["Id"])


@contextlib.contextmanager
def container(
    docker_host: str,
    image: str,
    *command: str,
    env: Mapping[str, str] | None = None,
    options: Sequence[str] = (),
) -> Iterator[str]:
    """``docker run --detach --network=host`` of ``image``; yields the container id, removes it at exit."""
    args = ["run", "--detach", "--network=host", *options]
    for name, value in (env or {}).items():
        args += ["--env", f"{name}={value}"]
    cid = docker(docker_host, *args, image, *command).stdout.strip()
    try:
        yield cid
    finally:
        docker(docker_host, "rm", "--force", "--volumes", cid, check=False)


def appliance_env(http_port: int, replay_port: int) -> dict[str, str]:
    """A container's appliance settings: its API on 127.0.0.1:``http_port``, Coinbase the replay server."""
    return {
        "CRYPTOPI_HTTP_HOST": "127.0.0.1",
        "CRYPTOPI_HTTP_PORT": str(http_port),
        "CRYPTOPI_COINBASE_WS_URL": f"ws://127.0.0.1:{replay_port}",
        "CRYPTOPI_COINBASE_REST_URL": f"http://127.0.0.1:{replay_port}",
    }


def container_logs(docker_host: str, cid: str, tail: int = 80) -> str:
    proc = docker(docker_host, "logs", "--tail", str(tail), cid, check=False)
    return proc.stdout + proc.stderr


def wait_healthy(docker_host: str, cid: str, timeout: float = 120) -> float:
    """Wait for the container's HEALTHCHECK to report ``healthy``; returns the seconds waited."""
    start = time.monotonic()
    while True:
        state = inspect(docker_host, "container", cid)["State"]
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return time.monotonic() - start
        if not state["Running"] or health == "unhealthy" or time.monotonic() - start > timeout:
            checks = (state.get("Health") or {}).get("Log", [])[-3:]
            raise DockerError(
                f"container {cid[:12]} is {state['Status']}, health {health!r} after "
                f"{time.monotonic() - start:.0f}s; last checks {checks}\n{container_logs(docker_host, cid)}"
            )
        time.sleep(0.25)


# -- arm64 under emulation ----------------------------------------------------------------------------------

BINFMT = Path("/proc/sys/fs/binfmt_misc")


@contextlib.contextmanager
def qemu_binfmt(arch: str = "aarch64") -> Iterator[None]:
    """Register QEMU's ``qemu-ARCH`` binfmt handler (qemu-user-static) unless it is there already.

    At exit it unregisters only what it registered (and unmounts binfmt_misc if it mounted it).
    """
    mounted = registered = False
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
        mounted = True
    entry = BINFMT / f"qemu-{arch}"
    try:
        if not entry.exists():
            conf = Path(f"/usr/lib/binfmt.d/qemu-{arch}.conf")
            if not conf.is_file():
                raise DockerError(f"{conf} is missing: apt-get install qemu-user-static")
            (BINFMT / "register").write_bytes(conf.read_bytes().strip())
            registered = True
        if not entry.read_text().startswith("enabled"):
            raise DockerError(f"{entry} is registered but disabled")
        yield
    finally:
        if registered and entry.exists():
            entry.write_text("-1")
        if mounted:
            subprocess.run(["umount", str(BINFMT)], check=False)


# -- pytest fixtures ----------------------------------------------------------------------------------------
# tests/conftest.py loads this module as a plugin: one engine, base and image for the whole session.


@dataclasses.dataclass(frozen=True)
class AppImage:
    """The appliance image built from the repository's Dockerfile on the local base."""

    tag: str
    build: str  # its BUILD argument (shown by /health)
    base: str
    build_s: float


@pytest.fixture(scope="session", name="docker_host")
def docker_host_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private engine for the session (root only: dockerd, mounts)."""
    if os.geteuid() != 0:
        pytest.fail("the Docker tests start their own dockerd: run them as root (CI does)")
    with docker_engine(tmp_path_factory.mktemp("docker")) as docker_host:
        yield docker_host


@pytest.fixture(scope="session", name="docker_base")
def docker_base_fixture(docker_host: str) -> str:
    """The debootstrap Python 3.11 base image (made once per machine, imported once per engine)."""
    start = time.monotonic()
    tag = base_image(docker_host)
    size_mb = image_size(docker_host, tag) / 1e6
    print(f"\nbase image {tag}: {size_mb:.0f} MB, ready in {time.monotonic() - start:.1f}s")
    return tag


@pytest.fixture(scope="session", name="app_image")
def app_image_fixture(
    docker_host: str, docker_base: str, tmp_path_factory: pytest.TempPathFactory
) -> AppImage:
    """``cryptopi:test``, built with the classic builder from the repository's Dockerfile."""
    build = f"test-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("build") / "build.log"
    start = time.monotonic()
    build_image(docker_host, "cryptopi:test", {"BASE": docker_base, "BUILD": build}, log=log)
    seconds = time.monotonic() - start
    print(f"\nimage cryptopi:test built in {seconds:.1f}s (log: {log})")
    return AppImage("cryptopi:test", build, docker_base, seconds)


def _possible_cpus() -> int:
    """How many CPUs the kernel says may exist (``/sys/devices/system/cpu/possible``, e.g. "0-3")."""
    try:
        spec = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    return max(int(part.split("-")[-1]) for part in spec.split(",")) + 1


def pi4_emulation(folder: Path) -> list[str]:
    """``docker run`` options that make an emulated arm64 container see a Raspberry Pi 4 (Cortex-A72).

    - ``QEMU_CPU=cortex-a72``: qemu-user's default CPU is "max" (SVE, SME, bf16, …), on which onnxruntime
      picks kernels that qemu 7.2 (Debian 12) gets wrong: the CNN's outputs come out garbage. Emulating the
      Pi 4's own core gives the amd64 results bit for bit.
    - ``/proc/cpuinfo``: qemu-user 7.2 passes the x86 host's through, and onnxruntime >= 1.28 (its cpuinfo
      library) dereferences NULL when it finds no ARM core there: ``import onnxruntime`` dies with SIGSEGV,
      under emulation only. A bind-mounted Cortex-A72 description, one entry per possible CPU (the library
      also reads sysfs), is what a real Pi shows.
    """
    core = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
        "CPU revision\t: 3\n\n"
    )
    text = "".join(core.format(n=n) for n in range(_possible_cpus()))
    text += "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cpuinfo-aarch64"
    path.write_text(text)
    return ["--volume", f"{path}:/proc/cpuinfo:ro", "--env", "QEMU_CPU=cortex-a72"]
