"""Compile the Rego policy to a Wasm bundle with OPA's own compiler (``opa build -t wasm``).

Test files (``*_test.rego``) are left out; the bundle's entrypoint is the decision path.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from common.binaries import find_binary


def build_wasm_bundle(policies_dir: str | Path, output: str | Path, policy_path: str,
                      opa_binary: str = "opa") -> Path:
    source, output = Path(policies_dir), Path(output)
    with tempfile.TemporaryDirectory(prefix="kernelgate-policy-") as tmp:
        staged = Path(tmp) / "policies"
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns("*_test.rego", ".*"))
        partial = Path(tmp) / "bundle.tar.gz"
        proc = subprocess.run([find_binary(opa_binary), "build", "-t", "wasm", "-e", policy_path.strip("/"),
                               "-o", str(partial), str(staged)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"opa build failed: {proc.stderr.strip() or proc.stdout.strip()}")
        output.parent.mkdir(parents=True, exist_ok=True)
        # Replace atomically: a sidecar watching the file never reads half a bundle.
        tmp_out = output.with_name(output.name + ".tmp")
        shutil.copyfile(partial, tmp_out)
        tmp_out.replace(output)
    return output
