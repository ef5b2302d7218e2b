"""Run the rendered cpu-dev pod with ``podman play kube`` and prove one request through it.

In: the images scripts/pod-run.sh built (the kernelgate image, and stand-ins for Envoy, OPA
and Jaeger at the manifests' versions), the overlay k8s/overlays/cpu-dev. Out: the pod and
Jaeger running on this machine's network (host network), and a JSON record: the status of a
completion sent through the pod's Envoy with the demo key, the image digest, the trace id
found in the pod's Jaeger with the services that reported into it, and the command.

What differs from a kubelet running the same manifests is listed in ``PODMAN_CHANGES`` and
written into the record; each is a gap of podman 4.3's ``play kube`` on one machine, not a
change to what the manifests ask for.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import platform
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "k8s" / "overlays" / "cpu-dev"
GPU_OVERLAY = ROOT / "k8s" / "overlays" / "gpu"
DEMO_KEY = "kg-demo-acme-key"  # config/api-keys.yaml holds its hash
NODE_NAME = socket.gethostname()
SERVICES = ("kernelgate-envoy", "kernelgate-authz", "kernelgate-inference")
# Kinds ``play kube`` acts on; it skips the rest (Namespace, Service, NetworkPolicy, PDB),
# which are left out so its output is not a list of "not supported" lines.
PLAYED_KINDS = {"Deployment", "ConfigMap", "Secret"}

PODMAN_CHANGES = [
    "hostNetwork: true, and hostAliases mapping each Service name (jaeger, kernelgate, kernelgate-inference) "
    "to 127.0.0.1, where its pod listens on this one machine (no cluster DNS here). podman 4.3 gives "
    "hostAliases only to the pod's infra container on the host network, so the names also go into the "
    "hosts file podman starts every container's /etc/hosts from (containers.conf base_hosts_file)",
    "the projected volume kernelgate-config (ConfigMap kernelgate-config + Secret kernelgate-secrets) "
    "becomes one ConfigMap volume holding the same files: podman 4.3 has no projected volumes",
    "env from fieldRef metadata.namespace and spec.nodeName set to their values: podman 4.3 resolves "
    "only metadata.name and metadata.uid",
    "probes removed from the containers and run by this script from the host, as the kubelet would "
    "(httpGet and grpc readiness probes): podman 4.3 turns a livenessProbe into `curl` inside the "
    "container, which the images do not have, and has no gRPC probes",
    "containerPort lists removed: podman 4.3 publishes each as a host port, which the host network "
    "refuses; on the host network every port is reachable as it is",
    "images envoyproxy/envoy, openpolicyagent/opa and jaegertracing/jaeger replaced by local stand-ins "
    "(the same program versions on the same Debian base): no registry is reachable",
    "Namespace, Service, NetworkPolicy and PodDisruptionBudget left out: play kube does not act on them",
]


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kustomize", "build", str(path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def service_names(docs: list[dict[str, Any]]) -> list[str]:
    """The overlay's Services: on one machine's host network each is the pods on loopback."""
    return sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Service")


def for_podman(docs: list[dict[str, Any]], images: dict[str, str]) -> list[dict[str, Any]]:
    """The rendered overlay with PODMAN_CHANGES applied; everything else as rendered."""
    aliases = [{"ip": "127.0.0.1", "hostnames": service_names(docs)}]
    docs = copy.deepcopy([d for d in docs if d["kind"] in PLAYED_KINDS])
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    extra = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        namespace = doc["metadata"].get("namespace", "default")
        spec = _pod_spec(doc)
        spec["hostNetwork"] = True
        spec["hostAliases"] = aliases
        for volume in spec.get("volumes", []):
            if "projected" not in volume:
                continue
            data: dict[str, str] = {}
            for source in volume.pop("projected")["sources"]:
                if "configMap" in source:
                    data.update(by_name[("ConfigMap", source["configMap"]["name"])]["data"])
                else:
                    secret = by_name[("Secret", source["secret"]["name"])]
                    data.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
            name = f"{doc['metadata']['name']}-{volume['name']}-podman"
            extra.append({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": name, "namespace": namespace}, "data": data})
            volume["configMap"] = {"name": name}
        for cont in spec.get("initContainers", []) + spec["containers"]:
            for key in ("livenessProbe", "readinessProbe", "startupProbe", "ports"):
                cont.pop(key, None)
            image = cont["image"].rsplit(":", 1)[0]
            cont["image"] = images.get(image, cont["image"])
            for env in cont.get("env", []):
                path = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if path in ("metadata.namespace", "spec.nodeName"):
                    env.pop("valueFrom")
                    env["value"] = namespace if path == "metadata.namespace" else NODE_NAME
    return docs + extra


# --- readiness, as the kubelet probes it --------------------------------------------------------


def _port(cont: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in cont["ports"] if p.get("name") == port)


def probe_once(cont: dict[str, Any]) -> bool:
    probe = cont["readinessProbe"]
    if "grpc" in probe:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{probe['grpc']['port']}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING
    get = probe["httpGet"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{_port(cont, get['port'])}{get['path']}", timeout=2) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(docs: list[dict[str, Any]], timeout: float) -> dict[str, float]:
    """Each container's readiness probe (from the rendered manifests) until it passes."""
    started = time.monotonic()
    pending = {f"{d['metadata']['name']}/{c['name']}": c for d in docs if d["kind"] == "Deployment"
               for c in _pod_spec(d)["containers"] if "readinessProbe" in c}
    ready: dict[str, float] = {}
    while pending:
        for ref, cont in list(pending.items()):
            if probe_once(cont):
                ready[ref] = round(time.monotonic() - started, 1)
                pending.pop(ref)
        if pending and time.monotonic() - started > timeout:
            raise TimeoutError(f"not ready after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(1)
    return ready


def busy_ports(docs: list[dict[str, Any]]) -> list[int]:
    """Host ports the pods will bind (host network) that something else already holds."""
    ports = sorted({p["containerPort"] for d in docs if d["kind"] == "Deployment"
                    for c in _pod_spec(d)["containers"] for p in c.get("ports", [])})
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


# --- one request, and its trace ------------------------------------------------------------------


def completion(trace_id: str) -> tuple[int, dict[str, Any]]:
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    body = {"model": "tiny-gpt2", "prompt": "Hello, kernelgate", "max_tokens": 16}
    request = urllib.request.Request(
        "http://127.0.0.1:8080/v1/completions", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "x-api-key": DEMO_KEY, "traceparent": traceparent})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def trace_services(trace_id: str, timeout: float = 60) -> dict[str, int]:
    """Spans per service of that trace in the pod's Jaeger (query API on :16686), once all report."""
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:16686/api/v3/traces/{trace_id}", timeout=5) as r:
                data = json.loads(r.read())
            found = {}
            for rs in data.get("result", {}).get("resourceSpans", []):
                attrs = {a["key"]: a["value"].get("stringValue") for a in rs["resource"].get("attributes", [])}
                spans = sum(len(ss.get("spans", [])) for ss in rs.get("scopeSpans", []))
                found[attrs.get("service.name", "?")] = found.get(attrs.get("service.name", "?"), 0) + spans
            if set(SERVICES) <= set(found):
                return found
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(1)
    return found


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the kernelgate image tag the overlays name")
    parser.add_argument("--stand-in", action="append", default=[], metavar="UPSTREAM=LOCAL",
                        help="image (without tag) to replace, e.g. envoyproxy/envoy=localhost/kernelgate/envoy:v1.40.0")
    parser.add_argument("--work", type=Path, required=True, help="where the played YAML and logs go")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "k8s_pod_run.json")
    parser.add_argument("--down", action="store_true", help="stop and remove the pods when done")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for every readiness probe to pass")
    parser.add_argument("--command", default=" ".join(map(shlex.quote, sys.argv)), help=argparse.SUPPRESS)
    args = parser.parse_args()

    rendered = kustomize(OVERLAY)
    images = {k: v for k, v in (s.split("=", 1) for s in args.stand_in)}
    named = {c["image"] for d in rendered if d["kind"] == "Deployment" for c in _pod_spec(d)["containers"]}
    if args.image not in named:
        raise SystemExit(f"the overlay names {sorted(named)}, not {args.image}")
    gpu_images = {c["image"] for d in kustomize(GPU_OVERLAY) if d["kind"] == "Deployment"
                  for c in _pod_spec(d)["containers"]}
    played = for_podman(rendered, images)
    args.work.mkdir(parents=True, exist_ok=True)
    # scripts/pod-run.sh's containers.conf names this file as base_hosts_file.
    (args.work / "hosts").write_text(Path("/etc/hosts").read_text().rstrip("\n") + "\n"
                                     + "127.0.0.1 " + " ".join(service_names(rendered)) + "\n")
    pod_yaml = args.work / "cpu-dev-podman.yaml"
    pod_yaml.write_text(yaml.safe_dump_all(played, sort_keys=False))

    podman("play", "kube", "--down", str(pod_yaml), check=False)  # a previous run's pods
    if busy := busy_ports(rendered):
        raise SystemExit(f"ports {busy} are in use on this machine; the pod needs them (host network)")
    played_out = podman("play", "kube", str(pod_yaml), check=False)
    if played_out.returncode:
        raise SystemExit(f"podman play kube failed:\n{played_out.stdout}{played_out.stderr}")
    try:
        ready = wait_ready(rendered, args.timeout)
        trace_id = secrets.token_hex(16)
        status, body = completion(trace_id)
        services = trace_services(trace_id) if status == 200 else {}
    except BaseException:
        logs = podman("pod", "logs", "--tail", "40", "kernelgate-pod-0", check=False)
        print(logs.stdout + logs.stderr, file=sys.stderr)
        if args.down:
            podman("play", "kube", "--down", str(pod_yaml), check=False)
        raise
    image = json.loads(podman("image", "inspect", args.image).stdout)[0]
    containers = json.loads(podman("pod", "inspect", "kernelgate-pod-0").stdout).get("Containers", [])
    users = {}
    for cont in containers:
        info = json.loads(podman("container", "inspect", cont["Id"]).stdout)[0]
        if info["Config"]["Image"].startswith(args.image.split(":")[0]) or info["ImageName"] == args.image:
            users[info["Name"]] = {"user": info["Config"]["User"],
                                   "read_only_root": info["HostConfig"]["ReadonlyRootfs"]}
    record = {
        "what": "the rendered cpu-dev overlay run by `podman play kube` (host network): one completion "
                "through its Envoy with the demo key, and its trace read back from the pod's Jaeger",
        "command": args.command,
        "device": f"CPU only ({platform.machine()}, {os.cpu_count()} cores, no GPU), shared with other work",
        "podman": podman("--version").stdout.strip(),
        "image": args.image,
        "image_digest": image["Digest"],
        "image_id": "sha256:" + image["Id"],
        "image_size_bytes": image["Size"],
        "gpu_overlay_images": sorted(gpu_images),
        "gpu_overlay_same_tag": args.image in gpu_images,
        "stand_in_images": images,
        "containers_from_image": users,
        "ready_after_s": ready,
        "status": status,
        "completion": body,
        "trace_id": trace_id,
        "trace_spans_by_service": services,
        "trace_complete": set(SERVICES) <= set(services),
        "podman_changes": PODMAN_CHANGES,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    if args.down:
        podman("play", "kube", "--down", str(pod_yaml), check=False)
    ok = status == 200 and record["trace_complete"]
    print(json.dumps({k: record[k] for k in ("status", "image_digest", "trace_id", "trace_spans_by_service")}))
    print(f"wrote {args.output}")
    if not args.down:
        print(f"""
The pod is running (host network). Send a request:
  curl -s localhost:8080/v1/completions -H 'x-api-key: {DEMO_KEY}' -H 'content-type: application/json' \\
       -d '{{"model": "tiny-gpt2", "prompt": "Hello, kernelgate", "max_tokens": 16}}'
Traces: http://localhost:16686 (trace {trace_id})
Stop it: podman play kube --down {pod_yaml}""")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
