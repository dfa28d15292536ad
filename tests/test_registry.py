"""The model registry's guards, each at its edge, through its public functions on a real folder."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.features import FEATURE_NAMES, SPEC_HASH, SPEC_NAME
from appliance.registry import LATEST, RegistryError, latest, latest_versions, load_version, set_latest

VERSION = "btc-usd-3600s-20260101t0000z-test"
Edit = Callable[[dict[str, Any]], None]


def write_version(root: Path, version: str = VERSION, edit: Edit | None = None) -> Path:
    """A minimal valid version: one model file with its checksum, trained on this build's feature spec.

    The one place that knows the manifest's schema: a schema change means editing only this.
    ``edit`` changes the manifest document before it is written.
    """
    folder = root / version
    folder.mkdir(parents=True)
    model, volatility = b"an onnx graph's bytes", b"another graph's bytes"
    (folder / "lasso.onnx").write_bytes(model)
    (folder / "volatility.onnx").write_bytes(volatility)
    doc: dict[str, Any] = {
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "product": "BTC-USD",
        "granularity": 3600,
        "feature_spec": {"name": SPEC_NAME, "hash": SPEC_HASH, "names": list(FEATURE_NAMES)},
        "models": {
            "lasso": {
                "file": "lasso.onnx",
                "framework": "scikit-learn",
                "input_name": "features",
                "output_name": "log_return",
                "intervals": {"quantiles": {"0.8": 1.28, "0.95": 1.96}},
                "metrics": {"holdout": {"mae": 271.5}},
            },
            "persistence": {
                "file": None,
                "framework": "none",
                "intervals": {"quantiles": {"0.8": 1.3, "0.95": 2.0}},
                "metrics": {"holdout": {"mae": 271.8}},
            },
        },
        "volatility": {
            "file": "volatility.onnx",
            "input_name": "features",
            "output_name": "log_variance",
            "metrics": {"holdout": {"mae_log_variance": 0.9}},
        },
        "training_data": {
            "source": "coinbase_BTC-USD_1h.csv",
            "first_candle": "2023-12-31T23:00:00Z",
            "last_candle": "2026-05-08T16:00:00Z",
            "holdout_start": "2025-11-01T00:00:00Z",
            "rows_train": 15000,
            "rows_holdout": 4514,
        },
        "gate": {"passed": True},
        "files": {
            "lasso.onnx": hashlib.sha256(model).hexdigest(),
            "volatility.onnx": hashlib.sha256(volatility).hexdigest(),
        },
    }
    if edit is not None:
        edit(doc)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


def test_a_minimal_version_loads_with_the_defaults_serving_assumes(tmp_path: Path) -> None:
    manifest = load_version(write_version(tmp_path))
    assert (manifest.version, manifest.product, manifest.granularity) == (VERSION, "BTC-USD", 3600)
    assert manifest.horizon == 1  # the next candle
    entry = manifest.models["lasso"]
    assert entry.output == "log_return"  # next close = last close * exp(shrink * output)
    assert entry.shrink == 1.0
    assert entry.intervals.scale == "volatility_model"
    assert manifest.models["persistence"].file is None  # served without a graph
    assert manifest.volatility.output == "log_variance"
    with pytest.raises(ValidationError, match="frozen"):
        manifest.version = "another"  # type: ignore[misc]


def listed(name: str, data: bytes) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["files"][name] = hashlib.sha256(data).hexdigest()

    return edit


def other_spec(field: str, value: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["feature_spec"][field] = value

    return edit


def model_file(name: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["models"]["lasso"]["file"] = name

    return edit


def volatility_file(name: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["volatility"]["file"] = name

    return edit


def no_input_name(doc: dict[str, Any]) -> None:
    del doc["models"]["lasso"]["input_name"]


def unknown_field(doc: dict[str, Any]) -> None:
    doc["comment"] = "not in the schema"


def no_product(doc: dict[str, Any]) -> None:
    del doc["product"]


def manifest_a_folder(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()


def file_outside(folder: Path) -> None:
    (folder.parent / "outside.onnx").write_bytes(b"x")


def file_in_a_subfolder(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "inside.onnx").write_bytes(b"x")


UNREADABLE = r": unreadable manifest: (?s:.*)"
REFUSED: list[tuple[str, Edit | None, Callable[[Path], object] | None, str]] = [
    ("manifest missing", None, lambda f: (f / "manifest.json").unlink(), UNREADABLE + "No such file"),
    ("manifest a folder", None, manifest_a_folder, UNREADABLE + "Is a directory"),
    ("manifest not JSON", None, lambda f: (f / "manifest.json").write_text("{"), UNREADABLE + "JSONDecode"),
    ("manifest without a field", no_product, None, UNREADABLE + r"\nproduct\n  Field required"),
    ("manifest with an unknown field", unknown_field, None, UNREADABLE + r"\ncomment\n  Extra inputs"),
    ("a listed file missing", listed("cnn.onnx", b"x"), None, r": file 'cnn.onnx' is missing$"),
    # The file exists and its checksum is right, but it lies outside the version's folder.
    ("a listed file outside the folder", listed("../outside.onnx", b"x"), file_outside,
     r": file '../outside.onnx' is missing$"),
    ("a listed file in a subfolder", listed("sub/inside.onnx", b"x"), file_in_a_subfolder,
     r": file 'sub/inside.onnx' is missing$"),
    ("a file changed after training", None, lambda f: (f / "lasso.onnx").write_bytes(b"tampered"),
     r": lasso.onnx does not match its sha256 in the manifest$"),
    ("a model file without a checksum", model_file("cnn.onnx"), lambda f: (f / "cnn.onnx").write_bytes(b"x"),
     r": model lasso names cnn.onnx, which has no checksum$"),
    ("a volatility file without a checksum", volatility_file("vol2.onnx"), None,
     r": the volatility model names vol2.onnx, which has no checksum$"),
    ("a graph without its input and output names", no_input_name, None,
     UNREADABLE + r"lasso.onnx needs its input_name and output_name"),
    ("another feature spec's hash", other_spec("hash", "0" * 64), None,
     rf": trained on feature spec {SPEC_NAME} 0{{12}}, this build computes {SPEC_NAME} {SPEC_HASH[:12]}$"),
    ("another feature spec's name", other_spec("name", "cryptopi-features-v0"), None,
     rf": trained on feature spec cryptopi-features-v0 {SPEC_HASH[:12]}, this build computes {SPEC_NAME} "),
]  # fmt: skip


@pytest.mark.parametrize(("case", "edit", "then", "says"), REFUSED, ids=[r[0] for r in REFUSED])
def test_load_version_refuses_with_the_reason(
    tmp_path: Path, case: str, edit: Edit | None, then: Callable[[Path], object] | None, says: str
) -> None:
    folder = write_version(tmp_path, edit=edit)
    if then is not None:
        then(folder)
    with pytest.raises(RegistryError, match=f"^{folder}{says}"):
        load_version(folder)


def test_latest_versions_reads_the_product_and_granularity_map(tmp_path: Path) -> None:
    assert latest_versions(tmp_path) == {}  # nothing promoted yet
    doc = {"format": 2, "versions": {"BTC-USD": {"3600": VERSION, "900": "btc-q"}, "*": {"3600": "any"}}}
    (tmp_path / LATEST).write_text(json.dumps(doc))
    assert latest_versions(tmp_path) == {"BTC-USD": {3600: VERSION, 900: "btc-q"}, "*": {3600: "any"}}


def test_latest_versions_reads_a_format_1_map_as_hourly(tmp_path: Path) -> None:
    (tmp_path / LATEST).write_text(json.dumps({"BTC-USD": VERSION, "ETH-USD": "eth-v1"}))
    assert latest_versions(tmp_path) == {"BTC-USD": {3600: VERSION}, "ETH-USD": {3600: "eth-v1"}}


@pytest.mark.parametrize(
    "content",
    ['["BTC-USD"]', '{"BTC-USD": 5}', '{"BTC-USD": "v1", "ETH-USD": null}', '"v1"', "{}",
     '{"format": 3, "versions": {}}', '{"format": 2, "versions": {"BTC-USD": {"1h": "v1"}}}',
     '{"format": 2, "versions": {"BTC-USD": {"3600": 5}}}', '{"format": 2, "versions": ["v1"]}'],
)  # fmt: skip
def test_latest_versions_refuses_what_is_not_a_version_map(tmp_path: Path, content: str) -> None:
    (tmp_path / LATEST).write_text(content)
    with pytest.raises(
        RegistryError, match=rf"^{tmp_path / LATEST} is not a product -> granularity -> version map$"
    ):
        latest_versions(tmp_path)


def test_latest_loads_the_version_a_product_points_at(tmp_path: Path) -> None:
    write_version(tmp_path)
    set_latest(tmp_path, "BTC-USD", 3600, VERSION)
    manifest = latest(tmp_path, "BTC-USD")
    assert manifest is not None
    assert manifest.version == VERSION
    assert latest(tmp_path, "ETH-USD") is None


def test_set_latest_writes_a_readable_map_atomically_and_keeps_other_products(tmp_path: Path) -> None:
    write_version(tmp_path)
    write_version(tmp_path, "eth-usd-v1")
    set_latest(tmp_path, "ETH-USD", 3600, "eth-usd-v1")
    set_latest(tmp_path, "BTC-USD", 3600, VERSION)
    path = tmp_path / LATEST
    assert latest_versions(tmp_path) == {"BTC-USD": {3600: VERSION}, "ETH-USD": {3600: "eth-usd-v1"}}
    assert path.stat().st_mode & 0o777 == 0o644  # the appliance's own (non-root) user must read it
    assert path.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "btc-usd-3600s-20260101t0000z-test",
        "eth-usd-v1",
        LATEST,
    ]


@pytest.mark.parametrize("version", ["../" + VERSION, "ab", "Btc-Usd-V1", "-btc", ".hidden", "x" * 102])
def test_set_latest_refuses_a_name_that_is_not_a_version(tmp_path: Path, version: str) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    write_version(
        root / ".." if "/" in version else root, version.rpartition("/")[2]
    )  # there: only the name is wrong
    with pytest.raises(RegistryError, match=rf"^no version {version!r} in {root}$"):
        set_latest(root, "BTC-USD", 3600, version)
    assert latest_versions(root) == {}


@pytest.mark.parametrize("version", ["abc", "x" * 101, "0.1_a-b"])
def test_set_latest_takes_names_at_the_edges_of_the_pattern(tmp_path: Path, version: str) -> None:
    write_version(tmp_path, version)
    set_latest(tmp_path, "BTC-USD", 3600, version)
    assert latest_versions(tmp_path) == {"BTC-USD": {3600: version}}


def test_set_latest_refuses_a_version_that_is_not_there(tmp_path: Path) -> None:
    write_version(tmp_path)
    with pytest.raises(RegistryError, match=rf"^no version 'btc-usd-missing' in {tmp_path}$"):
        set_latest(tmp_path, "BTC-USD", 3600, "btc-usd-missing")
    (tmp_path / "btc-usd-empty").mkdir()  # a folder without a manifest is not a version either
    with pytest.raises(RegistryError, match=r"^no version 'btc-usd-empty' in "):
        set_latest(tmp_path, "BTC-USD", 3600, "btc-usd-empty")
    assert not (tmp_path / LATEST).exists()


@pytest.mark.parametrize("name", ["../outside-version", "/etc/cryptopi-version", "sub/../../outside-version"])
def test_a_latest_entry_outside_the_registry_is_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    write_version(tmp_path, "outside-version")  # a valid version, but beside the registry, not in it
    doc = {"format": 2, "versions": {"BTC-USD": {"3600": name}}}
    (root / LATEST).write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match=rf"^{root}: {name!r} is not a version of this registry$"):
        latest(root, "BTC-USD")


def test_a_version_that_is_a_symlink_out_of_the_registry_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    elsewhere = write_version(tmp_path, "elsewhere-version")
    (root / "btc-usd-linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RegistryError, match=r"'btc-usd-linked' is not a version of this registry$"):
        set_latest(root, "BTC-USD", 3600, "btc-usd-linked")
    assert not (root / LATEST).exists()


def test_a_listed_file_that_links_out_of_its_version_is_missing(tmp_path: Path) -> None:
    folder = write_version(tmp_path)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((folder / "lasso.onnx").read_bytes())  # the very bytes the checksum names
    (folder / "lasso.onnx").unlink()
    (folder / "lasso.onnx").symlink_to(outside)
    with pytest.raises(RegistryError, match=r": file 'lasso.onnx' is missing$"):
        load_version(folder)


def test_a_huge_file_is_refused_from_its_size_before_it_is_read(tmp_path: Path) -> None:
    folder = write_version(tmp_path)
    with (folder / "lasso.onnx").open("r+b") as fh:
        fh.truncate(4 << 30)  # 4 GiB, sparse: reading it would take seconds, its size takes nothing
    with pytest.raises(RegistryError, match=r": lasso.onnx is 4,294,967,296 bytes, more than 67,108,864$"):
        load_version(folder)
