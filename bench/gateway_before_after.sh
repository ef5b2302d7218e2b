#!/usr/bin/env bash
# This checkout's bench/gateway.py (the interleaved harness) against the sidecar of two trees,
# run four times (before, after, after, before), to show what a change did to the sidecar's data
# path on this machine. The harness is the same for both; only the sidecar code differs (the
# sidecar processes get PYTHONPATH=<tree>). BEFORE: a commit (default c023b10: the HTTP transport
# merged with main, before the hot-path changes of #14); AFTER: this checkout. Extra arguments
# replace the harness arguments below (a BEFORE tree without authz.http_listen needs --systems
# without kg_http_*). bench/results/gateway_before_after.json (2b0e0a4 vs f696967) was made by
# the earlier harness: `git show 57f9c21:bench/gateway_before_after.sh`.
#   bash bench/gateway_before_after.sh [BEFORE_COMMIT] [OUT_DIR] [harness arguments...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-c023b10}"; OUT="${2:-$(mktemp -d /tmp/gw-before-after-XXXX)}"
export PATH="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv/bin:${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/bin:$PATH"
BEFORE="$OUT/before-tree"; mkdir -p "$BEFORE"; git -C "$ROOT" archive "$BASE" | tar -x -C "$BEFORE"
ARGS=(--systems envoy_only kg_grpc_server kg_grpc_wasm kg_http_wasm --workloads distinct --rates 250 500
      --concurrency 8 --window 5 --rounds 1)
[ $# -gt 2 ] && ARGS=("${@:3}")
i=0
for t in before after after before; do
  i=$((i + 1)); tree="$ROOT"; [ "$t" = before ] && tree="$BEFORE"
  (cd "$tree" && PYTHONPATH="$tree" python "$ROOT/bench/gateway.py" "${ARGS[@]}" --out "$OUT/gw-$i-$t" \
     >"$OUT/gw-$i-$t.log" 2>&1)
  echo "$i $t done"
done
echo "results under $OUT/gw-*-{before,after}/authz_vs_opa.json"
