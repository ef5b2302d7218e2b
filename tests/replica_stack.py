"""Envoy -> sidecar -> OPA in front of several real inference servers (``kernelgate serve``, CPU).

``ReplicaStack`` is ``AuthzStack`` with N inference replicas as Envoy's upstreams (and, optionally,
replicas of other models, e.g. a fallback). Tests and ``bench/replica_failover.py`` kill, restart
and read them: which replica served a request (``x-kernelgate-replica``), Envoy's view of each host
(``/clusters``), its JSON access log. ``open_loop`` sends requests at a fixed rate and classifies
every outcome (ok, failed before it started, failed after).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml

from common.replicas import NOT_STARTED_HEADER, REPLICA_HEADER
from common.models import MODEL_VERSION_HEADER
from tests import procs
from tests.procs import Proc, free_port
from tests.stack import ACME_KEY, AuthzStack, deep_merge

# Envoy tuned for tests: failures are noticed in about a second, an ejected replica comes back
# as soon as its health check passes.
FAST_UPSTREAM = {"health_check_interval_s": 0.25, "health_check_timeout_s": 0.5, "unhealthy_threshold": 2,
                 "outlier_interval_s": 0.25, "outlier_base_ejection_s": 2.0, "outlier_consecutive_5xx": 2}


@dataclass
class Replica:
    """One inference server process: its id (``x-kernelgate-replica``), the model it serves and its bounds."""

    name: str
    model: str = "tiny-gpt2"
    random_config: str = "tiny-gpt2"
    max_batch_size: int = 8
    max_queue: int = 64
    port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inference_config(self) -> dict[str, Any]:
        return {"replica_id": self.name, "listen": {"host": "127.0.0.1", "port": self.port},
                "model": {"name": self.model, "random_config": self.random_config, "device": "cpu",
                          "use_deepspeed": False},
                "batching": {"max_batch_size": self.max_batch_size, "max_queue": self.max_queue},
                "limits": {"drain_timeout_s": 5}}


@dataclass
class ReplicaStack(AuthzStack):
    replicas: list[Replica] = field(default_factory=list)
    # Replicas of other models (a fallback): each model its own Envoy cluster.
    others: list[Replica] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.access_log = self.workdir / "access.jsonl"

    def config(self) -> dict[str, Any]:
        config = super().config()
        models: dict[str, list[str]] = {}
        for replica in self.others:
            models.setdefault(replica.model, []).append(replica.address)
        envoy = {"upstream_addresses": [r.address for r in self.replicas], "model_upstreams": models,
                 "upstream": FAST_UPSTREAM, "access_log_path": str(self.access_log)}
        # targets null: the sidecar polls the replicas Envoy routes to (the config loader's default).
        authz = {"replicas": {"targets": None, "poll_interval_s": 0.1, "timeout_s": 0.5}}
        config["envoy"] = deep_merge(deep_merge(config["envoy"], envoy), self.envoy_overrides)
        config["authz"] = deep_merge(deep_merge(config["authz"], authz), self.authz_overrides)
        return config

    # --- processes -------------------------------------------------------------
    def start(self) -> "ReplicaStack":
        self.start_opa()
        for replica in self.replicas + self.others:
            self.start_replica(replica, wait=False)
        for replica in self.replicas + self.others:
            self.wait_replica(replica)
        self.start_sidecar()
        self.start_envoy()
        self.wait_healthy({r.address for r in self.replicas + self.others})
        return self

    def start_replica(self, replica: Replica, wait: bool = True) -> Proc:
        path = self.workdir / f"{replica.name}.yaml"
        path.write_text(yaml.safe_dump({**self.config(), "inference": replica.inference_config()}))
        proc = procs.start(replica.name, [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(path)],
                           self.logs, env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
        self.procs[replica.name] = proc
        if wait:
            self.wait_replica(replica)
        return proc

    def wait_replica(self, replica: Replica) -> None:
        procs.wait_http(f"http://{replica.address}/readyz", proc=self.procs[replica.name], timeout=300)

    def kill(self, replica: Replica) -> None:
        """SIGKILL: the process and everything it held are gone at once."""
        self.procs[replica.name].stop(sig=signal.SIGKILL)

    # --- Envoy's view ------------------------------------------------------------
    def hosts(self) -> dict[str, dict[str, str]]:
        """Per upstream host of every inference cluster: Envoy's /clusters counters and health flags."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=5) as resp:
            text = resp.read().decode()
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0].startswith("inference"):
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts

    def healthy(self, address: str) -> bool:
        return self.hosts().get(address, {}).get("health_flags") == "healthy"

    def wait_healthy(self, addresses: set[str], timeout: float = 30.0) -> None:
        wait_for(lambda: all(self.healthy(a) for a in addresses), timeout, f"Envoy to see {sorted(addresses)} healthy")

    def access_log_entries(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def sidecar_metric(self, name: str, **labels: str) -> float | None:
        """A sample of the sidecar's /metrics with exactly these labels (None when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# --- load ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request sent through Envoy."""

    sent_at: float
    latency_s: float
    status: int
    replica: str
    attempts: int
    kind: str  # "ok", "failed_not_started", "failed_started"
    detail: str = ""
    version: str = ""  # x-kernelgate-model-version: the model version that answered


# Envoy's own answers when it never got a request to a replica (connection refused, no healthy
# host, circuit open): nothing started anywhere.
_NOT_STARTED_REASONS = ("connection failure", "no healthy upstream", "overflow")


def classify(status: int, headers: dict[str, str], text: str) -> tuple[str, str]:
    if status == 200:
        return "ok", ""
    if NOT_STARTED_HEADER in headers:
        return "failed_not_started", f"{status} refused by the server before starting"
    if status == 503 and any(reason in text for reason in _NOT_STARTED_REASONS):
        return "failed_not_started", text[:200]
    return "failed_started", f"{status} {text[:200]}"


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], api_key: str = ACME_KEY,
               path: str = "/v1/completions") -> tuple[int, dict[str, str], str]:
    headers = {"content-type": "application/json", "x-api-key": api_key}
    async with session.post(url + path, data=json.dumps(body), headers=headers) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.text()


async def open_loop(url: str, body: dict[str, Any], rate: float, duration_s: float) -> list[Outcome]:
    """Send ``rate`` requests a second for ``duration_s`` whatever the answers (open loop); wait for all.

    ``sent_at`` counts from the first request; run faults beside it (``asyncio.gather``).
    """
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(sent_at: float) -> None:
            started = time.monotonic()
            try:
                status, headers, text = await send(session, url, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes.append(Outcome(sent_at, time.monotonic() - started, 0, "", 0, "failed_started", repr(exc)))
                return
            kind, detail = classify(status, headers, text)
            outcomes.append(Outcome(sent_at, time.monotonic() - started, status, headers.get(REPLICA_HEADER, ""),
                                    int(headers.get("x-envoy-attempt-count", "1")), kind, detail,
                                    headers.get(MODEL_VERSION_HEADER, "")))

        tasks = []
        t0 = time.monotonic()
        total = int(rate * duration_s)
        for i in range(total):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(time.monotonic() - t0)))
        await asyncio.gather(*tasks)
    return sorted(outcomes, key=lambda o: o.sent_at)


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def write_policy_data(stack: AuthzStack, update: Callable[[dict[str, Any]], None]) -> None:
    """Edit this stack's copy of policies/data.json (OPA watches the folder and reloads)."""
    path = stack.policy_dir / "data.json"
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


