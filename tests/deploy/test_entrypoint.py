"""The container's entrypoint command runs on this machine with the environment the dev overlay gives the
container, and serves /ready.

What is taken from the manifests and the image: the ENTRYPOINT (`scaleserve serve`, from the Dockerfile),
the image's ENV, then the Deployment's env/envFrom (ConfigMap and the generated API-keys Secret) on top, as
Kubernetes does. What is changed, because it describes the node rather than the server: paths under the
pod's volume mounts point into a temp dir (Secret volumes hold the rendered Secret's files), the host is
127.0.0.1 instead of 0.0.0.0, and the port is a free one. The model is the one the overlay names: dev names
none, so the embedded default model is converted on first start, as in the pod.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .k8s_render import REPO, container_env, dockerfile_entrypoint, dockerfile_env, one, secret_data, volume_mounts

READY_TIMEOUT_S = 300.0  # bounded: conversion of the embedded model takes seconds on 2 CPU cores
OVERLAY = "dev"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _materialize_volumes(objs: list[dict], root: Path) -> dict[str, Path]:
    """mountPath -> a local dir standing in for the volume; Secret volumes get the Secret's files."""
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objs if o["kind"] == "Secret"}
    local = {}
    for mount, vol in volume_mounts(objs).items():
        d = root / vol["name"]
        d.mkdir(parents=True, exist_ok=True)
        if "secret" in vol:
            data = secrets[vol["secret"]["secretName"]]
            items = vol["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                (d / it["path"]).write_text(data[it["key"]])
        local[mount] = d
    return local


def _remap(value: str, local: dict[str, Path]) -> str:
    scheme = "file://" if value.startswith("file:///") else ""
    path = value[len(scheme):]
    for mount in sorted(local, key=len, reverse=True):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return scheme + str(local[mount]) + path[len(mount.rstrip("/")):]
    return value


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


@pytest.mark.slow
def test_entrypoint_serves_ready_with_the_manifest_env(rendered, tmp_path):
    objs = rendered[OVERLAY]
    manifest_env, external = container_env(objs)
    assert not external, f"dev must not need out-of-band objects: {external}"
    local = _materialize_volumes(objs, tmp_path / "volumes")

    # Image ENV, then the Deployment's env on top (Kubernetes semantics); PATH/HOME stay this machine's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALESERVE_")}
    for k, v in dockerfile_env(REPO / "Dockerfile").items():
        if k not in ("PATH", "HOME"):
            env[k] = _remap(v, local)
    for k, v in manifest_env.items():
        env[k] = _remap(v, local)
    port = _free_port()
    env.update(SCALESERVE_HOST="127.0.0.1", SCALESERVE_PORT=str(port))
    assert manifest_env["SCALESERVE_HOST"] == "0.0.0.0"
    for k in ("SCALESERVE_DATA_DIR", "SCALESERVE_API_KEYS_FILE"):
        assert env[k].startswith(str(tmp_path)), (k, env[k])
    assert Path(env["SCALESERVE_API_KEYS_FILE"]).is_file()

    cmd = dockerfile_entrypoint(REPO / "Dockerfile")
    exe = Path(sys.executable).parent / cmd[0]  # the console script in this environment
    if not exe.exists():
        pytest.skip(f"{cmd[0]} console script not installed (pip install -e .)")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = False
        with httpx.Client(timeout=5.0) as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    text = _tail(log)
                    if "No module named 'scaleserve.server.main'" in text:
                        pytest.skip("the server (`scaleserve serve`) is not built yet:\n" + text[-600:])
                    pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode} before /ready:\n{text}")
                try:
                    if http.get(base + "/ready").status_code == 200:
                        ready = True
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert ready, f"/ready not 200 within {READY_TIMEOUT_S:.0f} s:\n{_tail(log)}"
            assert http.get(base + "/health").status_code == 200
            metrics = http.get(base + "/metrics").text
            # What the HPA (through prometheus-adapter) and the dashboard read.
            for name in ("scaleserve_requests_waiting", "scaleserve_requests_running",
                         "scaleserve_kv_cache_usage_ratio"):
                assert name in metrics, f"{name} missing from /metrics"
            # The API key from the rendered Secret (mounted file) is accepted.
            key = next(line.split("=", 1)[0] for line in
                       Path(env["SCALESERVE_API_KEYS_FILE"]).read_text().splitlines() if line.endswith("=admin"))
            r = http.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (r.status_code, r.text[:300])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
    grace = float(manifest_env["SCALESERVE_DRAIN_GRACE_S"])
    try:
        rc = proc.wait(timeout=grace + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit within drain grace {grace:.0f} s + 30 s after SIGTERM:\n{_tail(log)}")
    assert rc == 0, f"exit code {rc} after SIGTERM:\n{_tail(log)}"
    # Sanity: the rendered Deployment is the one we ran.
    assert one(objs, "Deployment", "scaleserve")["spec"]["replicas"] == 1
