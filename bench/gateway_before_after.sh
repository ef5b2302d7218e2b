#!/usr/bin/env bash
# What a change did to the sidecar's data path on this machine: the sidecar of BEFORE (a commit)
# and of this checkout up side by side in ONE bench/gateway.py run, interleaved round by round
# (systems NAME and NAME@before, --tree before=<the commit's tree>), so both share every round's
# drift; ratios after/before per round, pooled with a 90 % interval. The harness and Envoy are
# this checkout's; only the sidecar code differs. BEFORE defaults to 2b0e0a4 (main before the #17
# restructure), which has no HTTP ext_authz transport: the default systems are the gRPC ones.
# Writes OUT_DIR/authz_vs_opa.json (every row; ratios under workloads.distinct.ratios.trees) and
# bench/results/gateway_before_after.json (the summary) unless KG_BA_RESULT says otherwise.
#   bash bench/gateway_before_after.sh [BEFORE_COMMIT] [OUT_DIR] [harness arguments...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-2b0e0a4}"; OUT="${2:-$(mktemp -d /tmp/gw-before-after-XXXX)}"
export PATH="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv/bin:${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/bin:$PATH"
BEFORE="$OUT/before-tree"; mkdir -p "$BEFORE"; git -C "$ROOT" archive "$BASE" | tar -x -C "$BEFORE"
ARGS=(--systems envoy_only kg_grpc_server kg_grpc_server@before kg_grpc_wasm kg_grpc_wasm@before
      --workloads distinct --rates 250 500 --concurrency 8 --window 3 --rounds 8)
[ $# -gt 2 ] && ARGS=("${@:3}")
(cd "$ROOT" && PYTHONPATH="$ROOT" python bench/gateway.py --tree "before=$BEFORE" "${ARGS[@]}" --out "$OUT" \
   2>&1 | tee "$OUT/gateway.log")
AFTER="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- sidecar common kernelgate || echo '+changes')"
PYTHONPATH="$ROOT" python - "$OUT/authz_vs_opa.json" "${KG_BA_RESULT:-$ROOT/bench/results/gateway_before_after.json}" \
  "$BASE" "$AFTER" "bash bench/gateway_before_after.sh $*" <<'PY'
import json, os, sys
src, dst, before, after, command = sys.argv[1:]
run = json.loads(open(src).read())
distinct = run["workloads"]["distinct"]
summary = {}
for other, r in distinct["ratios"].get("trees", {}).items():
    name = other.partition("@")[0]
    summary[name] = {"closed_loop_rps_after_over_before": r["closed_loop_rps"],
                     "cpu_ms_per_check_after_over_before": r["cpu_ms_per_check"],
                     "p99_after_over_before": r["p99"],
                     "cpu_ms_per_check": {"after": distinct["systems"][name]["cpu_ms_per_check"],
                                          "before": distinct["systems"][other]["cpu_ms_per_check"]},
                     "closed_loop_rps": {"after": distinct["systems"][name]["closed_loop_rps"],
                                         "before": distinct["systems"][other]["closed_loop_rps"]}}
json.dump({"command": command, "harness_command": run["command"], "machine": run["machine"],
           "before": before, "after": after,
           "method": "the sidecars of both trees up side by side in one bench/gateway.py run, interleaved round by "
                     "round (order reversed every other round); ratios after/before per round, pooled as the median "
                     "with a bootstrap 90 % interval over rounds; CPU per check = the system's CPU per request minus "
                     "Envoy alone's in the same round, at the reference rate",
           "summary": summary, "duration_s": run["duration_s"]}, open(dst, "w"), indent=2)
open(dst, "a").write("\n")
print(json.dumps(summary, indent=1))
PY
