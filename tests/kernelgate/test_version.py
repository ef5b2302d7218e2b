"""``kernelgate --version`` prints the package version (what the image answers first, scripts/pod-run.sh)."""

from __future__ import annotations

import subprocess

from common.version import __version__
from common.processes import find_binary


def test_version_flag_prints_the_package_version():
    out = subprocess.run([find_binary("kernelgate"), "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kernelgate {__version__}"
