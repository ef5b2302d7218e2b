#!/usr/bin/env bash
# README command 2: install everything (idempotent) and run the whole test suite
# (pytest, which also runs `opa test policies/`). Exits non-zero when any test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
VENV="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv"
export PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
