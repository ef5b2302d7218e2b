#!/usr/bin/env bash
# README command 1: install everything (idempotent) and run the local stack on loopback.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
VENV="${KERNELGATE_HOME:-$HOME/.cache/kernelgate}/venv"
export PATH="$VENV/bin:$PATH"
exec kernelgate up --config "${KERNELGATE_CONFIG:-$ROOT/config/kernelgate.yaml}" "$@"
