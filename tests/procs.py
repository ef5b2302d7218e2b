"""Real programs for the tests: Redis and OPA on free loopback ports (generic helpers in common.processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from common.processes import ROOT, Proc, find_binary, free_port, start, wait_http, wait_tcp

__all__ = ["ROOT", "Proc", "envoy_validate", "find_binary", "free_port", "start", "start_opa", "start_redis",
           "wait_http", "wait_tcp"]


def envoy_validate(bootstrap: dict, path: Path) -> subprocess.CompletedProcess:
    """``envoy --mode validate`` on ``bootstrap`` (written to ``path``): Envoy's own verdict on a config."""
    path.write_text(yaml.safe_dump(bootstrap))
    return subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)


def start_redis(log_dir: Path, port: int | None = None) -> Proc:
    port = port or free_port()
    proc = start("redis", [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", str(log_dir)], log_dir, port=port)
    wait_tcp(port, proc=proc)
    return proc


def start_opa(log_dir: Path, policy_dir: Path, port: int | None = None, extra: list[str] | None = None) -> Proc:
    port = port or free_port()
    args = [find_binary("opa"), "run", "--server", "--addr", f"127.0.0.1:{port}", "--watch",
            "--log-level", "error", *(extra or []), str(policy_dir)]
    proc = start("opa", args, log_dir, port=port)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return proc
