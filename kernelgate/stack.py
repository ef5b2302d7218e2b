"""``kernelgate up``: the pod's processes on loopback, started in dependency order.

OPA, (Jaeger), the inference server, the authz sidecar, then Envoy in front, each
with the same config file and the same CLI the Kubernetes containers run. Ctrl-C or
SIGTERM stops them in reverse order, each draining its in-flight requests.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from kernelgate.config import KernelgateConfig
from kernelgate.envoy_admin import drain as drain_envoy
from kernelgate.envoy_config import render
from common.processes import Proc, find_binary, start, wait_http, wait_tcp

DEMO_KEY_HINT = "kg-demo-acme-key"


def run_stack(config: KernelgateConfig, config_path: str | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-up-"))
    logs = workdir / "logs"
    started: list[Proc] = []
    cli = [sys.executable, "-m", "kernelgate.cli"] + (["--config", config_path] if config_path else [])

    def launch(name: str, args: list[str]) -> Proc:
        proc = start(name, args, logs)
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
            inference = launch("inference", cli[:3] + ["serve"] + cli[3:])
            print("[up] loading the model and warming up…", flush=True)
            wait_http(f"http://{config.envoy.upstream_address}/readyz", proc=inference, timeout=900)

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
  inference server (direct):   http://{config.envoy.upstream_address}
  Jaeger UI:                   http://127.0.0.1:{config.stack.jaeger_ui_port}  (when telemetry is enabled)

  curl -s {url}/v1/completions -H 'x-api-key: {DEMO_KEY_HINT}' -H 'content-type: application/json' \\
       -d '{{"model": "tiny-gpt2", "prompt": "Hello, kernelgate", "max_tokens": 16}}'

Ctrl-C stops everything.""", flush=True)
