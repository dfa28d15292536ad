"""The appliance's Docker image: built from the real Dockerfile on a private engine, then run for real.

The base is a debootstrap Debian bookworm with Python 3.11 (Docker Hub is out of reach), the build uses the
classic builder with host networking, and the container runs with host networking on loopback against the
replay server, exactly as the appliance runs against Coinbase.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import LIVE_MARKET_ARGS, REPO, free_port, replay_process
from tests.dockerenv import (
    AppImage,
    appliance_env,
    container,
    container_logs,
    docker,
    image_size,
    inspect,
    wait_healthy,
)

#: The image's own layers, on top of its base (decimal MB, as ``docker images`` counts): about 137 MB
#: of runtime and 17 MB of registry (six versions of 2.7 MB: BTC-USD, ETH-USD and the pooled set, each
#: at both horizons).
MAX_RUNTIME_MB = 160

#: Imported inside the image: what must be there, and what must not (the training stack, dev tools).
PROBE = """
import importlib, importlib.util, json, os, sys
from pathlib import Path
def importable(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False
import appliance
package = Path(appliance.__file__).parent
print(json.dumps({
    "ort_telemetry_off": os.environ.get("ORT_DISABLE_TELEMETRY") == "1",
    "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "data_writable": os.access("/data", os.W_OK),
    "python": sys.executable, "prefix": sys.prefix,
    "absent": {m: not importable(m) for m in ("tensorflow", "keras", "sklearn", "pandas", "matplotlib",
                                               "tf2onnx", "skl2onnx", "onnx", "docker", "pytest", "training",
                                               "webhook", "tests", "pip")},
    "present": {m: importable(m) for m in ("numpy", "onnxruntime", "fastapi", "uvicorn", "uvloop",
                                            "appliance.runtime", "sqlite_utils")},
    "datasets": (package / "datasets").exists(),
    "models": sorted(p.name for p in (package / "models").iterdir()),
    "bytecode": Path(importlib.util.cache_from_source(str(package / "runtime.py"))).is_file(),
}))
"""


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_image_config(docker_host: str, app_image: AppImage) -> None:
    config = inspect(docker_host, "image", app_image.tag)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/venv/bin/python", "-m", "appliance"]
    assert config["Cmd"] == ["up"]
    assert config["WorkingDir"] == "/data"
    assert "/data" in config["Volumes"]
    assert "8000/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["CRYPTOPI_DATA_DIR"] == "/data"
    assert env["CRYPTOPI_BUILD"] == app_image.build
    health = config["Healthcheck"]
    assert health["Test"] == ["CMD", "/opt/venv/bin/python", "-m", "appliance", "healthcheck"]
    seconds = [health[k] / 1e9 for k in ("Interval", "Timeout", "StartPeriod")]
    assert (seconds, health["Retries"]) == ([10, 5, 30], 3)
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "cryptopi"
    assert labels["org.opencontainers.image.version"] == app_image.build


def test_runtime_layers_fit_the_budget(docker_host: str, app_image: AppImage) -> None:
    base, total = image_size(docker_host, app_image.base), image_size(docker_host, app_image.tag)
    runtime_mb = (total - base) / 1e6
    print(f"\nimage {total / 1e6:.1f} MB = base {base / 1e6:.1f} MB + runtime layers {runtime_mb:.1f} MB")
    print(docker(docker_host, "history", "--format", "{{.Size}}\t{{.CreatedBy}}", app_image.tag).stdout)
    assert runtime_mb <= MAX_RUNTIME_MB


def test_image_holds_the_runtime_set_only(docker_host: str, app_image: AppImage) -> None:
    proc = docker(docker_host, "run", "--rm", "--network=host", "--entrypoint", "/opt/venv/bin/python",
                  app_image.tag, "-c", PROBE)  # fmt: skip
    probe = json.loads(proc.stdout)
    assert (probe["uid"], probe["gid"]) == (10001, 10001)
    assert probe["cwd"] == "/data"
    assert probe["data_writable"]
    assert probe["ort_telemetry_off"], "onnxruntime would report usage to Microsoft"
    assert probe["prefix"] == "/opt/venv"
    assert [m for m, absent in probe["absent"].items() if not absent] == []
    assert [m for m, present in probe["present"].items() if not present] == []
    assert probe["datasets"] is False
    expected_models = sorted(p.name for p in (REPO / "appliance" / "models").iterdir())
    assert probe["models"] == expected_models
    assert probe["bytecode"], "the package is not byte-compiled: every start would compile it again"
    # The same as the plain command line one would type.
    for module in ("tensorflow", "sklearn", "pandas"):
        assert docker(docker_host, "run", "--rm", "--entrypoint", "python", app_image.tag, "-c",
                      f"import {module}", check=False).returncode == 1  # fmt: skip


def test_container_serves_predictions(docker_host: str, app_image: AppImage) -> None:
    """``up`` in the container against the replay server: healthy, predicting, stopping cleanly."""
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    with replay_process(LIVE_MARKET_ARGS) as replay_port:
        start = time.monotonic()
        with container(docker_host, app_image.tag, env=appliance_env(http_port, replay_port)) as cid:
            healthy_s = wait_healthy(docker_host, cid, timeout=90)
            deadline = time.monotonic() + 90
            while True:
                r = httpx.get(f"{url}/api/predict", params={"product": "BTC-USD", "model": "cnn"}, timeout=5)
                if r.status_code == 200:
                    break
                assert r.status_code == 503, r.text
                if time.monotonic() > deadline:
                    raise AssertionError(f"no prediction: {r.text}\n{container_logs(docker_host, cid)}")
                time.sleep(0.25)
            predicted_s = time.monotonic() - start
            prediction = r.json()
            assert prediction["predicted_close"] > 0
            interval = prediction["interval"]
            assert interval["lower"] < prediction["predicted_close"] < interval["upper"]
            health = httpx.get(f"{url}/health", timeout=5).json()
            assert health["build"] == app_image.build
            assert set(health["products"]) == {"BTC-USD", "ETH-USD"}

            check = time.monotonic()
            docker(docker_host, "exec", cid, "/opt/venv/bin/python", "-m", "appliance", "healthcheck")
            check_s = time.monotonic() - check

            stop = time.monotonic()
            docker(docker_host, "stop", "--time", "20", cid)
            stop_s = time.monotonic() - stop
            state = inspect(docker_host, "container", cid)["State"]
            logs = container_logs(docker_host, cid)
    print(
        f"\ncontainer healthy after {healthy_s:.1f}s, first BTC-USD cnn prediction after {predicted_s:.1f}s"
        f" ({prediction['predicted_close']:.2f} as of {prediction['as_of']}), one health check (docker exec)"
        f" {check_s:.2f}s, stopped in {stop_s:.1f}s"
    )
    assert state["ExitCode"] == 0, logs
    assert stop_s < 10, "SIGTERM did not stop the appliance: docker had to kill it"
