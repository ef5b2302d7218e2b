"""Where the external programs are: beside the venv's python, on PATH, or in the set-up cache."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KERNELGATE_HOME", Path.home() / ".cache/kernelgate"))


def find_binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    cached = cache_dir() / "bin" / name
    if cached.exists():
        return str(cached)
    raise FileNotFoundError(f"{name} not found: run scripts/setup.sh")
