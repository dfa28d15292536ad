"""The image the Raspberry Pi runs (linux/arm64), built here under QEMU: it must predict as the amd64 one.

``make smoke-arm64`` (``tests/smoke_arm64.py``) inside the suite, sharing its code: the amd64 side is the
session's ``cryptopi:test``, and the arm64 debootstrap root is cached in ``~/.cache/cryptopi-test`` like
the amd64 one, so a warm run costs the arm64 build and the two containers' run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dockerenv import AppImage, qemu_binfmt
from tests.smoke_arm64 import TOLERANCE, Phases, build_for, check_machine, serve_both


@pytest.mark.timeout(1800)  # debootstrap under QEMU on a clean machine, then the emulated build and run
def test_arm64_image_predicts_as_the_amd64_one(docker_host: str, app_image: AppImage, tmp_path: Path) -> None:
    phase = Phases()
    failures: list[str] = []
    with qemu_binfmt("aarch64"):
        check_machine(docker_host, app_image.tag, "amd64", app_image.base, tmp_path, failures)
        arm64 = build_for(docker_host, "arm64", tmp_path, phase, failures)
        images = {"amd64": app_image.tag, "arm64": arm64}
        serve_both(docker_host, images, tmp_path, phase, timeout=600, tolerance=TOLERANCE, failures=failures)
    phase.report()
    assert failures == []
