#!/usr/bin/env bash
# bench/gateway.py on two trees, interleaved (before, after, after, before), to show what a change
# did to the sidecar's data path on this machine. BEFORE: a commit (default 2b0e0a4, the tree before
# the #17 restructure and the #13/#22 sidecar changes); AFTER: this checkout.
#   bash bench/gateway_before_after.sh [BEFORE_COMMIT] [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-2b0e0a4}"; OUT="${2:-$(mktemp -d /tmp/gw-before-after-XXXX)}"
export PATH="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv/bin:${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/bin:$PATH"
BEFORE="$OUT/before-tree"; mkdir -p "$BEFORE"; git -C "$ROOT" archive "$BASE" | tar -x -C "$BEFORE"
ARGS=(--systems envoy_only kernelgate kernelgate_wasm --rates 250 500 --concurrency 8 --duration 5 --repeats 1 --no-check-rpc)
i=0
for t in before after after before; do
  i=$((i + 1)); tree="$ROOT"; [ "$t" = before ] && tree="$BEFORE"
  (cd "$tree" && PYTHONPATH="$tree" python bench/gateway.py "${ARGS[@]}" --out "$OUT/gw-$i-$t" >"$OUT/gw-$i-$t.log" 2>&1)
  echo "$i $t done"
done
echo "results under $OUT/gw-*-{before,after}/authz_vs_opa.json"
