"""CPU per check before and after a change: ``bench/check_cost.py`` of two trees, run alternately.

In: a git revision (``--before``; the tree after is this checkout), how many runs of each
(``--runs``), the check_cost arguments (``--checks``, ``--concurrency``). Each tree runs its own
check_cost.py with its own code on PYTHONPATH, whole gate (``--gate``) then policy only,
before/after alternating so drift of a shared machine falls on both alike.
Out: ``bench/results/check_cost.json`` (``--out``): per workload the runs, their medians, the
ratio after/before, and the steps of the last run of each tree.

    python bench/check_cost_ab.py --before 40c6749 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str) -> Path:
    tree = Path(tempfile.mkdtemp(prefix=f"kernelgate-{rev[:10]}-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def cost(tree: Path, gate: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "bench/check_cost.py", "--checks", str(args.checks), "--concurrency", str(args.concurrency),
           *(["--gate"] if gate else [])]
    out = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out[out.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the tree before")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/check_cost.json")
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    trees = {"before": export(args.before), "after": ROOT}
    loads = []
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "before": args.before, "after": head + (" + uncommitted changes" if subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True).stdout.strip() else ""),
        "what": "CPU (user + system, os.times) of the sidecar process per check, the sidecar in process fed the "
                f"HTTP authorization requests Envoy sends, {args.concurrency} in flight; distinct bodies (no "
                "decision cache hit); each tree runs its own bench/check_cost.py, before/after alternating",
    }
    for name, gate in (("gate_identity_wasm_policy_redis_budgets", True), ("policy_only_wasm", False)):
        runs: dict[str, list[float]] = {"before": [], "after": []}
        last: dict[str, dict] = {}
        for _ in range(args.runs):
            for side, tree in trees.items():
                last[side] = cost(tree, gate, args)
                runs[side].append(last[side]["cpu_us_per_check"])
                loads.append(os.getloadavg()[0])
                print(name, side, runs[side][-1], flush=True)
        before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
        result[name] = {"before_cpu_us_per_check": runs["before"], "after_cpu_us_per_check": runs["after"],
                        "before_median": before, "after_median": after,
                        "ratio_after_over_before": round(after / before, 3),
                        "steps_us_last_run": {side: last[side]["us_per_check_by_step"] for side in last}}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "load_average_1min_during": [round(min(loads), 2), round(max(loads), 2)],
                         "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict) or "ratio_after_over_before" in v},
                     indent=1))


if __name__ == "__main__":
    main()
