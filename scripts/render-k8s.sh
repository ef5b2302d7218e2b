#!/usr/bin/env bash
# Regenerate the files k8s/base derives from the rest of the repo. kustomize reads only
# files inside its own directory, so the policies and the demo secrets are copied there;
# the Envoy ConfigMap is `kernelgate envoy-config` of the pod's config file, never edited
# by hand. tests/kernelgate/test_k8s.py fails when any of them is stale. (The route table in the policy
# is checked against common/routes.py, the one list of routes, by tests/common/test_routes.py.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv"
KERNELGATE="$(command -v kernelgate || echo "$VENV/bin/kernelgate")"
BASE="$ROOT/k8s/base"

"$KERNELGATE" envoy-config --config "$BASE/kernelgate.yaml" --output "$BASE/envoy.yaml"
cp "$ROOT/policies/authz.rego" "$ROOT/policies/data.json" "$BASE/policies/"
cp "$ROOT/config/api-keys.yaml" "$ROOT/config/jwks.json" "$BASE/secrets/"
echo "rendered $BASE/envoy.yaml; synced policies/ and secrets/"
