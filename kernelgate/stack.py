"""``kernelgate up``: the pod's processes on loopback, started in dependency order.

OPA, (Jaeger), the inference server, the authz sidecar, then Envoy in front, each
with the same config file and the same CLI the Kubernetes containers run. Ctrl-C or
SIGTERM stops them in reverse order, each draining its in-flight requests.

``--replicas N`` starts N inference servers on consecutive ports from ``inference.listen.port``
(one GPU each when there are several; CPU processes otherwise); Envoy balances over them and
the sidecar polls their load: both learn the addresses from ``envoy.upstream_addresses``,
passed to every child as an environment override, so all read one list.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from common.processes import Proc, find_binary, start, wait_http, wait_tcp
from kernelgate.config import KernelgateConfig
from kernelgate.envoy_admin import drain as drain_envoy
from kernelgate.envoy_config import render

DEMO_KEY_HINT = "kg-demo-acme-key"


def replica_addresses(config: KernelgateConfig, replicas: int) -> list[str]:
    """host:port of each of ``replicas`` inference servers: consecutive ports from the configured one."""
    host = config.envoy.upstream_address.rpartition(":")[0] or "127.0.0.1"
    return [f"{host}:{config.inference.listen.port + i}" for i in range(replicas)]


def visible_gpus() -> list[str]:
    """GPU ids this machine offers (CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list; [] without GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def replica_envs(config: KernelgateConfig, replicas: int, gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each inference replica: its port, its id, and its GPU when there are several."""
    envs = []
    for i, address in enumerate(replica_addresses(config, replicas)):
        env = {"KERNELGATE__INFERENCE__LISTEN__PORT": address.rpartition(":")[2],
               "KERNELGATE__INFERENCE__REPLICA_ID": f"replica-{i}"}
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        envs.append(env)
    return envs


def run_stack(config: KernelgateConfig, config_path: str | None, replicas: int = 1) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-up-"))
    logs = workdir / "logs"
    started: list[Proc] = []
    cli = [sys.executable, "-m", "kernelgate.cli"] + (["--config", config_path] if config_path else [])
    shared_env: dict[str, str] = {}
    if replicas > 1:
        addresses = replica_addresses(config, replicas)
        config = replace(config, envoy=replace(config.envoy, upstream_addresses=addresses))
        # Every child reads the same list: the sidecar polls the replicas Envoy routes to.
        shared_env["KERNELGATE__ENVOY__UPSTREAM_ADDRESSES"] = json.dumps(addresses)

    def launch(name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = start(name, args, logs, env={**shared_env, **(env or {})})
        started.append(proc)
        print(f"[up] started {name} (pid {proc.popen.pid}, log {proc.log_path})", flush=True)
        return proc

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        opa_url = urlsplit(config.authz.opa.url)
        opa = launch("opa", [find_binary(config.stack.opa_binary), "run", "--server", "--watch", "--addr",
                             f"{opa_url.hostname}:{opa_url.port}", "--log-level", "error",
                             config.stack.policies_dir])
        wait_http(f"{config.authz.opa.url}/health", proc=opa)

        if config.stack.start_jaeger and config.telemetry.enabled:
            jaeger = launch("jaeger", [find_binary("jaeger")])
            wait_tcp(config.stack.jaeger_otlp_port, proc=jaeger, timeout=60)

        if config.stack.start_inference:
            gpus = visible_gpus()
            if replicas > 1:
                print(f"[up] {replicas} inference replicas on " + (f"GPUs {', '.join(gpus)}" if len(gpus) > 1
                      else "one device"), flush=True)
            servers = [(launch("inference" if replicas == 1 else f"inference-{i}", cli[:3] + ["serve"] + cli[3:],
                               env if replicas > 1 else None), address)
                       for i, (env, address) in enumerate(zip(replica_envs(config, replicas, gpus),
                                                              config.envoy.replicas, strict=True))]
            print("[up] loading the model and warming up…", flush=True)
            for proc, address in servers:
                wait_http(f"http://{address}/readyz", proc=proc, timeout=900)

        authz = launch("authz", cli[:3] + ["authz"] + cli[3:])
        wait_tcp(int(config.authz.listen.rpartition(":")[2]), proc=authz)

        bootstrap = workdir / "envoy.yaml"
        bootstrap.write_text(yaml.safe_dump(render(config.envoy), sort_keys=False))
        envoy = launch("envoy", [find_binary("envoy"), "-c", str(bootstrap), "--use-dynamic-base-id",
                                 "--log-level", "warn"])
        wait_http(f"http://{config.envoy.admin_host}:{config.envoy.admin_port}/ready", proc=envoy)

        _print_ready(config)
        while not stop.wait(0.5):
            dead = [p for p in started if p.popen.poll() is not None]
            if dead:
                print(f"[up] {dead[0].name} exited ({dead[0].popen.returncode}); stopping.\n{dead[0].log_tail()}",
                      file=sys.stderr)
                return 1
        return 0
    except (TimeoutError, RuntimeError, FileNotFoundError) as exc:
        print(f"[up] failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(started):
            if proc.name == "envoy" and proc.popen.poll() is None:
                with contextlib.suppress(OSError):
                    drain_envoy(f"http://{config.envoy.admin_host}:{config.envoy.admin_port}", timeout_s=15)
            proc.stop(timeout=15)
        print(f"[up] stopped; logs kept in {logs}", flush=True)


def _print_ready(config: KernelgateConfig) -> None:
    url = f"http://{config.envoy.listen_host}:{config.envoy.listen_port}"
    print(f"""
[up] kernelgate is ready.
  Envoy (send requests here): {url}
  authz sidecar (gRPC):        {config.authz.listen}
  OPA:                         {config.authz.opa.url}
  inference server(s) (direct): {", ".join(f"http://{a}" for a in config.envoy.replicas)}
  Jaeger UI:                   http://127.0.0.1:{config.stack.jaeger_ui_port}  (when telemetry is enabled)

  curl -s {url}/v1/completions -H 'x-api-key: {DEMO_KEY_HINT}' -H 'content-type: application/json' \\
       -d '{{"model": "tiny-gpt2", "prompt": "Hello, kernelgate", "max_tokens": 16}}'

Ctrl-C stops everything.""", flush=True)
