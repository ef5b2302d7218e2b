"""Soak: the whole stack at a steady load for a long time; nothing lost, nothing growing.

Envoy -> kernelgate authz (OPA, in-memory budgets) -> inference server (tiny model on
CPU) or the echo upstream, driven by vegeta at a fixed rate. Every 10 s it samples the
resident memory and open file descriptors of every process. At the end it checks that
every request sent got exactly one answer and that the decision log holds one line
per request.

    python bench/soak.py --duration 1800 --rate 20 --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway import bench_policies, start_envoy, write_targets  # noqa: E402
from common.processes import Proc, find_binary, free_port, start, wait_http, wait_tcp  # noqa: E402
from kernelgate.envoy_config import EnvoyConfig  # noqa: E402
from tests.stack import write_api_keys  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_stack(workdir: Path, upstream: str) -> tuple[list[Proc], str, Path]:
    opa_port, authz_port, inference_port, envoy_port = free_port(), free_port(), free_port(), free_port()
    logs = workdir / "logs"
    keys = workdir / "api-keys.yaml"
    write_api_keys(keys)
    decision_log = workdir / "decisions.jsonl"
    config = {
        "authz": {"listen": f"127.0.0.1:{authz_port}", "metrics_listen": "",
                  "opa": {"url": f"http://127.0.0.1:{opa_port}"},
                  "identity": {"api_keys_file": str(keys)},
                  "decision_log": {"output_file": str(decision_log)}},
        "inference": {"listen": {"host": "127.0.0.1", "port": inference_port}},
    }
    config_path = workdir / "kernelgate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    procs: list[Proc] = []
    try:
        opa = start("opa", [find_binary("opa"), "run", "--server", "--addr", f"127.0.0.1:{opa_port}",
                            "--log-level", "error", str(bench_policies(workdir))], logs)
        procs.append(opa)
        wait_http(f"http://127.0.0.1:{opa_port}/health", proc=opa)
        cli = [sys.executable, "-m", "kernelgate.cli", "--log-level", "warning"]
        if upstream == "inference":
            server = start("inference", [*cli, "serve", "--config", str(config_path)], logs,
                           env={"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
            procs.append(server)
            wait_http(f"http://127.0.0.1:{inference_port}/readyz", proc=server, timeout=600)
        else:
            server = start("upstream", [sys.executable, "-m", "tests.echo_upstream", str(inference_port)], logs)
            procs.append(server)
            wait_tcp(inference_port, proc=server)
        sidecar = start("sidecar", [*cli, "authz", "--config", str(config_path)], logs)
        procs.append(sidecar)
        wait_tcp(authz_port, proc=sidecar)
        procs.append(start_envoy(workdir, "soak", EnvoyConfig(
            listen_port=envoy_port, admin_port=free_port(), authz_address=f"127.0.0.1:{authz_port}",
            upstream_address=f"127.0.0.1:{inference_port}")))
    except BaseException:
        for proc in reversed(procs):  # a failed start leaves nothing running
            proc.stop()
        raise
    return procs, f"http://127.0.0.1:{envoy_port}", decision_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=1800)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--upstream", choices=["inference", "echo"], default="inference")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak.json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-soak-"))
    procs, url, decision_log = start_stack(workdir, args.upstream)
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append({"t_s": round(time.monotonic() - t0, 1), **{
                p.name: {"rss_mb": round(rss_mb(p.popen.pid), 1), "fds": open_fds(p.popen.pid)} for p in procs}})
            stop.wait(10)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        targets = workdir / "targets"
        write_targets(targets, url, 200)
        sampler.start()
        results = workdir / "results.bin"
        with results.open("wb") as fh:
            subprocess.run([find_binary("vegeta"), "attack", "-format=json", f"-targets={targets}",
                            f"-rate={args.rate}/s", f"-duration={args.duration}s", "-timeout=60s"],
                           stdout=fh, check=True)
        time.sleep(1)
        stop.set()
        sampler.join()
        report = json.loads(subprocess.run([find_binary("vegeta"), "report", "-type=json", str(results)],
                                           capture_output=True, check=True).stdout)
        alive = {p.name: p.popen.poll() is None for p in procs}
    finally:
        stop.set()
        for proc in reversed(procs):
            proc.stop()
    sent = report["requests"]
    lost = report["status_codes"].get("0", 0)
    decisions = sum(1 for line in decision_log.read_text().splitlines() if line.strip())
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    names = [p.name for p in procs]
    result = {
        "command": "python " + " ".join(sys.argv),
        "upstream": args.upstream, "rate": args.rate,
        "duration_s": args.duration, "sent": sent, "responses": sent - lost, "lost": lost,
        "status_codes": report["status_codes"], "decision_log_lines": decisions,
        "decision_log_matches_sent": decisions == sent,
        "processes_alive_at_end": alive,
        "rss_start_mb": max(first[n]["rss_mb"] for n in names),
        "rss_end_mb": max(last[n]["rss_mb"] for n in names),
        "per_process": {n: {"rss_start_mb": first[n]["rss_mb"], "rss_end_mb": last[n]["rss_mb"],
                            "fds_start": first[n]["fds"], "fds_end": last[n]["fds"]} for n in names},
        "latency_ms": {k: report["latencies"][k] / 1e6 for k in ("50th", "90th", "99th", "max")},
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "per_process")}, indent=2))


if __name__ == "__main__":
    main()
