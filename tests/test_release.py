"""The release program (``python -m training release``), end to end, as ``make release-local`` runs it.

Coinbase is the replay server (real 15-minute candles), Docker Hub a local registry, the builder the classic
one on the suite's private engine (reusing the layers ``cryptopi:test`` built). Small on purpose: two months
of real candles before the reported hold-out, both products at the hourly horizon only (the 15-minute one
trains the same way, in ``test_training.py`` and ``make release-local``), the tiny CNN, one fold.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.registry import Manifest, latest_versions, load_version
from tests.conftest import REPO
from tests.dockerenv import docker, local_registry
from tests.release_local import (
    CONFIG,
    Machine,
    Outcome,
    check_pushed,
    check_served,
    commit,
    registry_tags,
    release,
    serve,
    served_as,
)

MODELS = Path("appliance/models")
SHIPPED = REPO / MODELS
SMALL = tomllib.loads(CONFIG.read_text()) | {"granularities": [3600]}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def toml_file(path: Path, values: dict[str, Any]) -> Path:
    """``values`` (strings, numbers, dates and lists of them) as a TOML file."""
    lines = [f"{k} = {v.isoformat() if isinstance(v, date) else json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def new_versions(outcome: Outcome) -> dict[tuple[str, int], str]:
    return {(v["product"], v["granularity"]): v["version"] for v in outcome.report["models"]["versions"]}


@pytest.fixture(scope="module")
def machine(
    docker_host: str, docker_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machine]:
    with local_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield Machine(docker_host, registry, docker_base)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toml_file(tmp_path_factory.mktemp("config") / "release.toml", SMALL)


@pytest.fixture(scope="module")
def first(machine: Machine, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """``python -m training release all``: back-fill, train, gate, cards, build, push."""
    outcome = release(machine, tmp_path_factory.mktemp("first"), config)
    assert outcome.status == 0, outcome.output[-5000:]
    return outcome


@pytest.mark.timeout(900)
def test_release_pushes_every_tag_with_the_digest_it_reports(first: Outcome, machine: Machine) -> None:
    image, sha = first.report["image"], commit()
    names = [f"{VERSION}-1", sha, f"sha-{sha[:7]}"]  # no latest: not asked for
    assert image["tags"] == [f"{machine.registry}/cryptopi/appliance:{n}" for n in names]
    assert registry_tags(machine.registry) == sorted(names)
    assert check_pushed(machine, image) == []
    assert image["digest"].startswith("sha256:")
    assert image["build"] == f"{VERSION}-1+{sha[:12]}"
    assert image["platforms"] == ["linux/amd64"]
    # Both products' and the pooled set's new hourly versions passed the gate and are what the image
    # serves, beside the shipped 15-minute ones; their cards were collected; the repository's own
    # registry is untouched.
    new = new_versions(first)
    assert set(new) == {("BTC-USD", 3600), ("ETH-USD", 3600), ("*", 3600)}  # and the pooled set
    assert all(v["promoted"] for v in first.report["models"]["versions"])
    shipped = latest_versions(SHIPPED)
    assert image["serves"] == {
        p: {str(g): new.get((p, g), v) for g, v in by_g.items()} for p, by_g in shipped.items()
    }
    for version in new.values():
        assert (first.work / "model-cards" / version / "MODEL_CARD.md").is_file()
        assert not (SHIPPED / version).exists()
    assert f"### Pushed `{image['repository']}@{image['digest']}`" in first.output


@pytest.mark.timeout(600)
def test_the_pushed_image_serves_the_new_versions(first: Outcome, machine: Machine) -> None:
    """Pulled afresh by its digest and run against a replayed market, as a Pi runs it."""
    image = first.report["image"]
    served = serve(machine, image)
    assert check_served(served, image) == []
    assert served.versions == {served_as(p): v for (p, g), v in new_versions(first).items() if g == 3600}
    for prediction in served.predictions.values():
        assert (
            prediction["interval"]["lower"] < prediction["predicted_close"] < prediction["interval"]["upper"]
        )


def results(manifest: Manifest) -> dict[str, Any]:
    """A manifest without what names or times the run: its version, creation time, files' checksums
    and fitting times."""
    found = manifest.model_dump(mode="json", exclude={"version", "created_at", "files"})
    for entry in [*found["models"].values(), found["volatility"]]:
        entry["params"].pop("fit_seconds", None)
    return found


def weights(path: Path) -> list[tuple[str, tuple[int, ...], bytes]]:
    """An ONNX graph's constants by value, whatever their names."""
    import onnx
    from onnx import numpy_helper

    arrays = [np.asarray(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer]
    return sorted((str(a.dtype), a.shape, a.tobytes()) for a in arrays)


@pytest.mark.timeout(900)
def test_a_second_release_on_the_same_data_gives_the_same_metrics(
    first: Outcome, machine: Machine, config: Path, tmp_path: Path
) -> None:
    """Versions differ by name only (creation time, and the digest of files whose bytes differ): every
    metric, shrink factor, interval multiplier and the gate's decision are the same, the card and plots
    byte for byte, each ONNX graph's weights value for value."""
    second = release(machine, tmp_path, config, stage="models", run_number=2)
    assert second.status == 0, second.output[-5000:]
    again = new_versions(second)
    assert again.keys() == new_versions(first).keys()
    for key, version in new_versions(first).items():
        a = load_version(first.context / MODELS / version)
        b = load_version(second.context / MODELS / again[key])
        assert results(a) == results(b), key
        # The plots and the card byte for byte; the ONNX graphs by value (skl2onnx and tf2onnx name
        # some of their nodes and constants differently each run).
        assert a.files.keys() == b.files.keys()
        for name in a.files:
            if name.endswith(".onnx"):
                assert weights(first.context / MODELS / a.version / name) == weights(
                    second.context / MODELS / b.version / name
                ), (key, name)
            else:
                assert a.files[name] == b.files[name], (key, name)


@pytest.mark.timeout(600)
def test_a_refusing_gate_builds_and_pushes_nothing(machine: Machine, tmp_path: Path) -> None:
    strict = toml_file(
        tmp_path / "strict.toml", SMALL | {"products": ["BTC-USD"], "pooled": [], "gate_margin": -0.5}
    )
    refused = release(machine, tmp_path, strict, repository="cryptopi/refused")
    assert refused.status == 3, refused.output[-5000:]
    assert (
        "release stopped: the promotion gate refused a version; nothing is built or pushed" in refused.output
    )
    assert "image" not in refused.report
    (version,) = refused.report["models"]["versions"]
    assert version["promoted"] is False
    assert "MAE skill" in version["gate"]
    assert (refused.work / "model-cards" / version["version"] / "MODEL_CARD.md").is_file()  # still readable
    assert latest_versions(refused.context / MODELS) == latest_versions(SHIPPED)
    assert "Step 1/" not in refused.output, "a build started"
    assert registry_tags(machine.registry, "cryptopi/refused") == []
    assert docker(machine.host, "images", "--quiet", f"{machine.registry}/cryptopi/refused").stdout == ""


@pytest.mark.parametrize(
    ("change", "args", "named"),
    [
        ({"gate_margin": 0.01}, [], "gate_margin"),  # looser than training's gate
        ({"gate_p": 0.01}, [], "gate_p"),
        ({"granularities": [3600, 120]}, [], "granularities"),
        ({"products": ["btc-usd"]}, [], "products"),
        ({"pooled": ["BTC-USD"]}, [], "two or more products"),
        ({"holdout_days": 90}, [], "the hold-out would begin before history_start"),
        ({"horizons": [3600]}, [], "horizons"),  # an unknown key
        ({}, ["--builder", "classic", "--platform", "linux/arm64"], "need --builder buildx"),
        ({}, ["--image", "Cryptopi/App:v1"], "is not a repository"),
        ({}, ["--build-arg", "BUILD=x"], "BUILD is the release's own"),
        ({}, ["--commit", "abc"], "full 40-hex commit"),
    ],
)
def test_a_bad_configuration_is_refused_before_anything_starts(
    tmp_path: Path, change: dict[str, Any], args: list[str], named: str
) -> None:
    config = toml_file(tmp_path / "release.toml", SMALL | change)
    defaults = {"--image": "cryptopi/appliance", "--builder": "classic", "--commit": "0" * 40}
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = [a for k, v in (defaults | given).items() for a in (k, v)]
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "training", "release", "all", "--config", str(config), "--work", str(work),
         "--coinbase-url", "http://127.0.0.1:9", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "invalid release configuration" in proc.stderr
    assert named in proc.stderr
    assert not work.exists(), "something started"
