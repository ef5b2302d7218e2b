"""Envoy -> kernelgate sidecar -> OPA (and Redis), in front of the echo upstream or (``inference=True``)
the real inference server on CPU (tiny random-weight model), on loopback.

``AuthzStack`` starts the real programs with the same Envoy bootstrap that
``kernelgate envoy-config`` prints; tests restart, kill or slow any of them. With the
inference server, the two close the loop as in the pod: the sidecar counts prompts with the
server's ``/tokenize`` and the server reports each decision's usage to the sidecar.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.settings import build
from kernelgate.envoy_config import EnvoyConfig, render
from tests import procs
from tests.procs import ROOT, Proc, free_port

# Demo credentials used by the tests (hashes go in the key file, never the keys).
ACME_KEY = "kg-test-acme-0123456789"
GLOBEX_KEY = "kg-test-globex-0123456789"
INITECH_KEY = "kg-test-initech-0123456789"


def write_api_keys(path: Path) -> None:
    from sidecar.identity import hash_api_key

    entries = {
        hash_api_key(ACME_KEY): {"tenant": "acme", "tier": "pro", "scopes": ["*"], "name": "acme-ci"},
        hash_api_key(GLOBEX_KEY): {"tenant": "globex", "tier": "free",
                                   "scopes": ["completions", "models"], "name": "globex-ci"},
        hash_api_key(INITECH_KEY): {"tenant": "initech", "tier": "free", "scopes": ["*"], "name": "initech"},
    }
    path.write_text(yaml.safe_dump(entries))


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class AuthzStack:
    workdir: Path
    authz_overrides: dict[str, Any] = field(default_factory=dict)
    envoy_overrides: dict[str, Any] = field(default_factory=dict)
    redis_url: str | None = None
    # How Envoy asks the sidecar: "grpc" (Check) or "http" (http_service, sidecar/http_transport.py).
    transport: str = "grpc"
    inference: bool = False
    inference_overrides: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.policy_dir = self.workdir / "policies"
        shutil.copytree(ROOT / "policies", self.policy_dir,
                        ignore=shutil.ignore_patterns("*_test.rego"))
        self.keys_file = self.workdir / "api-keys.yaml"
        write_api_keys(self.keys_file)
        self.opa_port = free_port()
        self.authz_port = free_port()
        self.authz_http_port = free_port()
        self.metrics_port = free_port()
        self.upstream_port = free_port()
        self.envoy_port = free_port()
        self.admin_port = free_port()
        self.decision_log = self.workdir / "decisions.jsonl"

    # --- configuration -------------------------------------------------------
    def config(self) -> dict[str, Any]:
        authz: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.authz_port}",
            "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            "drain_s": 5,
            "opa": {"url": f"http://127.0.0.1:{self.opa_port}", "timeout_s": 0.5, "revision_poll_s": 0.2},
            "identity": {"api_keys_file": str(self.keys_file), "reload_interval_s": 0.2},
            "decision_log": {"output_file": str(self.decision_log)},
            # The echo upstream serves no load report (tests/e2e/ poll real inference replicas).
            "replicas": {"targets": []},
        }
        if self.transport == "http":
            authz["http_listen"] = f"127.0.0.1:{self.authz_http_port}"
        if self.redis_url:
            # 1 s, not the production 50 ms: the first call connects and loads the Lua script, which
            # on a busy 2-core CI machine can pass 50 ms and fall back to local budgets mid-test.
            authz["ratelimit"] = {"backend": "redis", "redis_url": self.redis_url, "redis_timeout_s": 1.0}
        envoy = {"listen_port": self.envoy_port, "admin_port": self.admin_port,
                 "authz_address": f"127.0.0.1:{self.authz_http_port if self.transport == 'http' else self.authz_port}",
                 "authz_transport": self.transport,
                 "upstream_address": f"127.0.0.1:{self.upstream_port}"}
        if self.inference:
            authz = deep_merge(authz, {"ratelimit": {
                "count_url": f"http://127.0.0.1:{self.upstream_port}/tokenize", "count_timeout_s": 2.0}})
        config = {"authz": deep_merge(authz, self.authz_overrides), "envoy": deep_merge(envoy, self.envoy_overrides)}
        if self.inference:
            config["inference"] = deep_merge({
                "listen": {"host": "127.0.0.1", "port": self.upstream_port},
                "model": {"name": "tiny-gpt2", "random_config": "tiny-gpt2", "device": "cpu", "use_deepspeed": False},
                "batching": {"max_batch_size": 16, "max_queue": 256},
                "usage_report": {"address": f"127.0.0.1:{self.authz_port}"},
            }, self.inference_overrides)
        return config

    def write_config(self) -> Path:
        path = self.workdir / "kernelgate.yaml"
        path.write_text(yaml.safe_dump(self.config()))
        return path

    # --- processes -------------------------------------------------------------
    def start(self) -> "AuthzStack":
        self.start_opa()
        if self.inference:
            self.start_inference()
        else:
            self.procs["upstream"] = procs.start("upstream", [sys.executable, "-m", "tests.echo_upstream",
                                                              str(self.upstream_port)], self.logs)
        self.start_sidecar()
        self.start_envoy()
        if self.inference:
            procs.wait_http(f"http://127.0.0.1:{self.upstream_port}/readyz", proc=self.procs["upstream"], timeout=300)
        else:
            procs.wait_tcp(self.upstream_port, proc=self.procs["upstream"])
        return self

    def start_inference(self) -> Proc:
        config = self.write_config()
        self.procs["upstream"] = procs.start("inference", [sys.executable, "-m", "kernelgate.cli", "serve",
                                                           "--config", str(config)], self.logs,
                                             env={"DS_ACCELERATOR": "cpu"})
        return self.procs["upstream"]

    def start_opa(self) -> Proc:
        self.procs["opa"] = procs.start_opa(self.logs, self.policy_dir, port=self.opa_port)
        return self.procs["opa"]

    def start_sidecar(self, name: str = "sidecar") -> Proc:
        config = self.write_config()
        proc = procs.start(name, [sys.executable, "-m", "kernelgate.cli", "authz", "--config", str(config)],
                           self.logs)
        procs.wait_tcp(self.authz_port, proc=proc)
        if self.transport == "http":
            procs.wait_tcp(self.authz_http_port, proc=proc)
        self.procs[name] = proc
        return proc

    def start_envoy(self) -> Proc:
        cfg = self.config()["envoy"]
        bootstrap = self.workdir / "envoy.yaml"
        bootstrap.write_text(yaml.safe_dump(render(build(EnvoyConfig, cfg, "envoy"))))
        proc = procs.start("envoy", [procs.find_binary("envoy"), "-c", str(bootstrap), "--use-dynamic-base-id",
                                     "--log-level", "warn", "--concurrency", "1"], self.logs)
        procs.wait_http(f"http://127.0.0.1:{self.admin_port}/ready", proc=proc)
        self.procs["envoy"] = proc
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    def log_lines(self) -> list[dict[str, Any]]:
        import json

        if not self.decision_log.exists():
            return []
        return [json.loads(line) for line in self.decision_log.read_text().splitlines() if line.strip()]

    def decisions(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("kind", "decision") == "decision"]

    def settlements(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("kind") == "settlement"]

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
