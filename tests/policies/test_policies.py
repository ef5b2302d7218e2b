"""`opa test policies/` runs as part of the suite, and the policy passes `opa check --strict`."""

from __future__ import annotations

import json
import subprocess

from common.processes import ROOT, find_binary


def test_opa_unit_tests_pass():
    proc = subprocess.run([find_binary("opa"), "test", "--timeout", "60s", "--format", "json", str(ROOT / "policies")],
                          capture_output=True, text=True, timeout=120)
    results = json.loads(proc.stdout or "[]")
    failed = [r["name"] for r in results if r.get("fail") or r.get("error")]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-2000:])
    assert len(results) >= 30, "the policy's test cases went missing"


def test_policy_passes_strict_check_and_format():
    opa = find_binary("opa")
    check = subprocess.run([opa, "check", "--strict", str(ROOT / "policies")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([opa, "fmt", "--list", str(ROOT / "policies")], capture_output=True, text=True)
    assert fmt.returncode == 0 and fmt.stdout.strip() == "", f"unformatted: {fmt.stdout}"
