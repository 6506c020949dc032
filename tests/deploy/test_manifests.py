"""Every kustomization under deploy/ renders with kubectl's built-in kustomize, every object validates against
the Kubernetes JSON schemas (offline, bundled in kubernetes-validate), and the objects agree with each other
and with the server's settings contract.

CRD kinds (ServiceMonitor) have no core schema: they are skipped by the schema check, explicitly, and their
fields are checked against the Service they select instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from .k8s_render import (
    CRD_KINDS,
    DEPLOY,
    K8S_VERSIONS,
    OVERLAYS,
    by_kind,
    container_env,
    kustomize,
    one,
    prestop_sleep_s,
    server_container,
    volume_mounts,
)

# Secrets an overlay expects to exist in the cluster (documented in docs/deploy.md); anything else it
# references must be rendered by it.
EXTERNAL_SECRETS = {"dev": set(), "prod": {"scaleserve-api-keys", "scaleserve-s3"}}
# Components that no overlay includes: rendered on top of the base in a scratch kustomization.
EXTRA_COMPONENTS = ("adapter-store-pvc",)

METRICS = {
    "scaleserve_requests_waiting",
    "scaleserve_requests_running",
    "scaleserve_kv_cache_usage_ratio",
    "scaleserve_time_to_first_token_seconds",
    "scaleserve_inter_token_latency_seconds",
    "scaleserve_e2e_request_latency_seconds",
    "scaleserve_prompt_tokens_total",
    "scaleserve_generation_tokens_total",
    "scaleserve_prefix_cache_queries_total",
    "scaleserve_prefix_cache_hits_total",
    "scaleserve_adapter_requests_total",
    "scaleserve_adapter_load_seconds",
    "scaleserve_errors_total",
}


def _scratch_with_component(tmp: Path, component: str) -> Path:
    # kustomize refuses absolute resource paths: point at the base and component relatively.
    rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(DEPLOY / "base")],
                "components": [rel(DEPLOY / "components" / component)],
            }
        )
    )
    return tmp


def _all_renders(kubectl, rendered, tmp_path_factory) -> dict[str, list[dict]]:
    renders = dict(rendered)
    for comp in EXTRA_COMPONENTS:
        renders[f"base+{comp}"] = kustomize(_scratch_with_component(tmp_path_factory.mktemp(comp), comp), kubectl)
    for side in ("prometheus-adapter", "grafana"):
        renders[side] = kustomize(DEPLOY / side, kubectl)
    return renders


@pytest.fixture(scope="session")
def all_renders(kubectl, rendered, tmp_path_factory) -> dict[str, list[dict]]:
    return _all_renders(kubectl, rendered, tmp_path_factory)


def test_every_overlay_renders(rendered):
    for ov, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds, ov
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy", "Ingress"} <= {
        o["kind"] for o in rendered["prod"]
    }


def test_every_object_validates_against_kubernetes_schemas(all_renders):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import SchemaNotFoundError

    skipped, checked = [], 0
    for render, objs in all_renders.items():
        for o in objs:
            if (o["apiVersion"], o["kind"]) in CRD_KINDS:
                skipped.append(f"{render}:{o['kind']}/{o['metadata']['name']}")
                continue
            for version in K8S_VERSIONS:
                try:
                    kv.validate(o, version, strict=True)
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    pytest.fail(f"{render}: {o['kind']}/{o['metadata']['name']} invalid for k8s {version}: {path}: {e.message}")
                except SchemaNotFoundError as e:
                    pytest.fail(f"{render}: no schema for {o['apiVersion']} {o['kind']} ({e.message}); "
                                "if it is a CRD, add it to CRD_KINDS with field checks")
            checked += 1
    assert checked > 20
    # The CRD objects we knowingly skip: exactly the prod ServiceMonitor.
    assert skipped == ["prod:ServiceMonitor/scaleserve"], skipped


def test_servicemonitor_scrapes_the_service(rendered):
    objs = rendered["prod"]
    sm, svc = one(objs, "ServiceMonitor", "scaleserve"), one(objs, "Service", "scaleserve")
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    assert sm["metadata"].get("namespace", svc["metadata"]["namespace"]) == svc["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_on_a_gpu_with_probes_drain_and_security(rendered, overlay):
    objs = rendered[overlay]
    dep = one(objs, "Deployment", "scaleserve")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(objs)
    env, _ = container_env(objs)

    res = c["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1" and str(res["requests"]["nvidia.com/gpu"]) == "1"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind

    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT (scaleserve serve) must run"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert str(port) == env["SCALESERVE_PORT"] and env["SCALESERVE_HOST"] == "0.0.0.0"
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "first start converts the model"

    # The kubelet SIGKILLs at terminationGracePeriodSeconds, counted from the start of preStop.
    grace = pod["terminationGracePeriodSeconds"]
    drain = float(env["SCALESERVE_DRAIN_GRACE_S"])
    assert prestop_sleep_s(c) >= 5
    assert grace >= prestop_sleep_s(c) + drain + 10, (grace, prestop_sleep_s(c), drain)

    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs every writable path on a volume.
    mounts = volume_mounts(objs)
    assert {"/tmp", "/data"} <= set(mounts)
    assert env["SCALESERVE_DATA_DIR"] == "/data"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_settings_fields_and_valid(rendered, overlay, monkeypatch):
    from scaleserve.server.settings import Settings

    env, _ = container_env(rendered[overlay])
    ours = {k: v for k, v in env.items() if k.startswith("SCALESERVE_")}
    fields = {f"SCALESERVE_{name.upper()}" for name in Settings.model_fields}
    unknown = set(ours) - fields
    # Settings ignores unknown env vars, so a typo here would silently do nothing.
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    for k in list(os.environ):
        if k.startswith("SCALESERVE_"):
            monkeypatch.delenv(k)
    for k, v in ours.items():
        monkeypatch.setenv(k, "dummy" if v == "<external>" else v)
    s = Settings()
    assert s.host == "0.0.0.0" and str(s.data_dir) == "/data"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay):
    objs = rendered[overlay]
    dep = one(objs, "Deployment", "scaleserve")
    pod = dep["spec"]["template"]
    names = lambda kind: {o["metadata"]["name"] for o in by_kind(objs, kind)}  # noqa: E731
    ns = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert len(ns) == 1 and None not in ns, ns
    if by_kind(objs, "Namespace"):
        assert one(objs, "Namespace")["metadata"]["name"] in ns

    _, external = container_env(objs)
    secrets_used = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    secrets_used |= {e.split("/", 1)[1] for e in external}
    assert secrets_used - names("Secret") == EXTERNAL_SECRETS[overlay]
    for v in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in names("PersistentVolumeClaim")
    assert pod["spec"]["serviceAccountName"] in names("ServiceAccount")

    pod_labels = pod["metadata"]["labels"]
    matches = lambda sel: all(pod_labels.get(k) == v for k, v in sel.items())  # noqa: E731
    assert matches(dep["spec"]["selector"]["matchLabels"])
    assert matches(one(objs, "Service", "scaleserve")["spec"]["selector"])
    assert matches(one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    for np_ in by_kind(objs, "NetworkPolicy"):
        assert matches(np_["spec"]["podSelector"]["matchLabels"])
        assert {p["port"] for r in np_["spec"]["ingress"] for p in r["ports"]} == {8000}
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaleserve"}
        assert hpa["spec"]["minReplicas"] >= 2
    svc_ports = {p["name"] for p in one(objs, "Service", "scaleserve")["spec"]["ports"]}
    for ing in by_kind(objs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                assert p["backend"]["service"]["name"] == "scaleserve"
                assert p["backend"]["service"]["port"]["name"] in svc_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_and_adapter_store_live_on_volumes(rendered, overlay):
    objs = rendered[overlay]
    env, _ = container_env(objs)
    mounts = volume_mounts(objs)
    pvcs = {o["metadata"]["name"]: o for o in by_kind(objs, "PersistentVolumeClaim")}

    def volume_of(path: str) -> dict:
        hits = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
        assert hits, f"{path} is on no volume (the root filesystem is read-only)"
        return mounts[max(hits, key=len)]

    if env.get("SCALESERVE_MODEL"):
        assert volume_of(env["SCALESERVE_MODEL"])  # a model volume (or /data)

    store = env.get("SCALESERVE_ADAPTER_STORE", "")
    uses_s3_creds = any(k.startswith("SCALESERVE_S3_") and "KEY" in k for k in env)
    dep = one(objs, "Deployment", "scaleserve")
    multi = dep["spec"]["replicas"] > 1 or bool(by_kind(objs, "HorizontalPodAutoscaler"))
    if store.startswith("s3://"):
        assert uses_s3_creds and env.get("SCALESERVE_S3_ENDPOINT_URL")
    else:
        assert store.startswith("file:///"), store
        vol = volume_of(store[len("file://"):])
        if multi:  # every replica must see every adapter
            claim = pvcs[vol["persistentVolumeClaim"]["claimName"]]
            assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_rwx_adapter_store_component_shares_a_volume(kubectl, tmp_path):
    objs = kustomize(_scratch_with_component(tmp_path, "adapter-store-pvc"), kubectl)
    claim = one(objs, "PersistentVolumeClaim", "scaleserve-adapters")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "/adapters" in volume_mounts(objs)


def test_hpa_metrics_are_served_by_the_prometheus_adapter_rules(rendered):
    rules = yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    served = {}
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        assert series in METRICS
        assert re.search(r["name"]["matches"], series)
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
        served[r["name"]["as"]] = r
    hpa = one(rendered["prod"], "HorizontalPodAutoscaler")
    used = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert "scaleserve_requests_waiting" in used
    assert used <= set(served), used - set(served)


def test_grafana_dashboard_uses_the_server_metrics():
    dash = json.loads((DEPLOY / "grafana" / "scaleserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    used = set()
    for e in exprs:
        for name in re.findall(r"\bscaleserve_[a-z0-9_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRICS or name in METRICS, f"unknown metric {name} in {e}"
            used.add(base if base in METRICS else name)
    assert used == METRICS, f"metrics without a panel: {sorted(METRICS - used)}"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
