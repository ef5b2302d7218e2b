"""k8s/: every manifest and every rendered overlay validates offline, the pod is wired and
locked down as documented, and the cpu-dev pod's own commands serve a request on loopback.

Overlays are rendered by the real kustomize (scripts/setup.sh builds it from its Go module).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.processes import ROOT, Proc, find_binary, free_port, start, wait_http
from kernelgate.config import load
from kernelgate.envoy_config import EnvoyConfig, render
from tests.k8s.manifests import K8S, OVERLAYS, container, find, kustomize_build

BASE = K8S / "base"
KUBE_VERSIONS = ("1.33", kubernetes_validate.latest_version())
DEMO_KEY = "kg-demo-acme-key"  # its hash is in config/api-keys.yaml (and so in the Secret)


# --- rendering and reading ------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(K8S / "overlays" / name) for name in OVERLAYS}


def manifest_files() -> list[Path]:
    """Every file a kustomization lists under ``resources`` (patches are checked once rendered)."""
    files = []
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                files.append(path)
    return files


def pod_spec(docs: list[dict[str, Any]], name: str = "kernelgate") -> dict[str, Any]:
    return find(docs, "Deployment", name)["spec"]["template"]["spec"]


def port_number(cont: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in cont["ports"] if p.get("name") == port)


def all_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for cont in spec.get("initContainers", []) + spec["containers"]:
                yield f"{doc['metadata']['name']}/{cont['name']}", cont, spec


# --- schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schema(path: Path, version: str):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_overlay_validates(rendered, overlay: str, version: str):
    for doc in rendered[overlay]:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_the_whole_deployment(rendered, overlay: str):
    docs = rendered[overlay]
    kinds = sorted(f"{d['kind']}/{re.sub(r'-[a-z0-9]{10}$', '', d['metadata']['name'])}" for d in docs)
    assert kinds == sorted([
        "Namespace/kernelgate", "ServiceAccount/kernelgate", "ServiceAccount/jaeger", "Deployment/kernelgate",
        "Service/kernelgate", "Service/kernelgate-inference", "NetworkPolicy/kernelgate-ingress",
        "PodDisruptionBudget/kernelgate", "ConfigMap/kernelgate-config", "ConfigMap/kernelgate-envoy",
        "ConfigMap/kernelgate-policies", "Secret/kernelgate-secrets", "Deployment/jaeger", "Service/jaeger"])
    images = {c["image"] for _, c, _ in all_containers(docs)}
    assert images == {"ghcr.io/kernelgate/kernelgate:0.1.0", "envoyproxy/envoy:v1.40.0",
                      "openpolicyagent/opa:1.19.1-static", "jaegertracing/jaeger:2.13.0"}


# --- the generated files --------------------------------------------------------------


def expected_envoy_yaml() -> str:
    """What ``kernelgate envoy-config --config k8s/base/kernelgate.yaml`` prints."""
    return yaml.safe_dump(render(load(BASE / "kernelgate.yaml", environ={}).envoy), sort_keys=False)


def test_envoy_configmap_file_is_the_rendered_bootstrap():
    assert (BASE / "envoy.yaml").read_text() == expected_envoy_yaml(), "stale: run scripts/render-k8s.sh"


def test_envoy_configmap_file_equals_the_cli_output():
    out = subprocess.run([find_binary("kernelgate"), "envoy-config", "--config", str(BASE / "kernelgate.yaml")],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("KERNELGATE__")})
    assert out.stdout == (BASE / "envoy.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_configmaps_carry_the_source_files(rendered, overlay: str):
    docs = rendered[overlay]
    assert find(docs, "ConfigMap", "kernelgate-envoy")["data"] == {"envoy.yaml": expected_envoy_yaml()}
    assert find(docs, "ConfigMap", "kernelgate-config")["data"] == {
        "kernelgate.yaml": (BASE / "kernelgate.yaml").read_text()}
    assert find(docs, "ConfigMap", "kernelgate-policies")["data"] == {
        name: (ROOT / "policies" / name).read_text() for name in ("authz.rego", "data.json")}
    secret = find(docs, "Secret", "kernelgate-secrets")["data"]
    assert {k: base64.b64decode(v).decode() for k, v in secret.items()} == {
        name: (ROOT / "config" / name).read_text() for name in ("api-keys.yaml", "jwks.json")}


def test_envoy_validates_the_configmap_bootstrap():
    out = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(BASE / "envoy.yaml"),
                          "--use-dynamic-base-id"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_copies_inside_the_kustomize_root_match_their_sources():
    """kustomize reads only below k8s/base; scripts/render-k8s.sh keeps these copies current."""
    pairs = {"policies/authz.rego": "policies/authz.rego", "policies/data.json": "policies/data.json",
             "secrets/api-keys.yaml": "config/api-keys.yaml", "secrets/jwks.json": "config/jwks.json"}
    for copy_path, source in pairs.items():
        assert (BASE / copy_path).read_bytes() == (ROOT / source).read_bytes(), f"stale {copy_path}"


def test_k8s_kernelgate_config_validates_with_the_cli():
    out = subprocess.run([find_binary("kernelgate"), "validate-config", "--config", str(BASE / "kernelgate.yaml")],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={k: v for k, v in os.environ.items() if not k.startswith("KERNELGATE__")})
    assert out.returncode == 0, out.stderr


def container_env(cont: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in cont.get("env", []) if "value" in e}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_container_loads_the_config_with_its_own_env(rendered, overlay: str):
    spec = pod_spec(rendered[overlay])
    for name in ("inference", "kernelgate-authz"):
        env = {k: v for k, v in container_env(container(spec, name)).items() if k.startswith("KERNELGATE__")}
        load(BASE / "kernelgate.yaml", environ=env)


# --- wiring inside the pod ------------------------------------------------------------


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition("/")[2].rpartition(":")
    return host, int(port)


def spec_labels(docs) -> dict:
    return find(docs, "Deployment", "kernelgate")["spec"]["template"]["metadata"]["labels"]


def test_pod_addresses_fit_the_container_ports(rendered):
    spec = pod_spec(rendered["cpu-dev"])
    config = load(BASE / "kernelgate.yaml", environ={})
    envoy, authz = container(spec, "envoy"), container(spec, "kernelgate-authz")
    inference = container(spec, "inference")
    assert (config.envoy.listen_host, config.envoy.listen_port) == ("0.0.0.0", port_number(envoy, "envoy-http"))
    assert config.envoy.admin_port == port_number(envoy, "envoy-admin")
    assert host_port(config.envoy.authz_address) == ("127.0.0.1", port_number(authz, "authz-grpc"))
    assert host_port(config.authz.listen)[1] == port_number(authz, "authz-grpc")
    assert host_port(config.authz.metrics_listen)[1] == port_number(authz, "authz-metrics")
    # Envoy and the sidecar reach every pod's inference server through the headless Service.
    headless = find(rendered["cpu-dev"], "Service", "kernelgate-inference")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= spec_labels(rendered["cpu-dev"]).items()
    [service_port] = headless["ports"]
    assert port_number(inference, service_port["targetPort"]) == service_port["port"]
    assert config.envoy.replicas == [f"kernelgate-inference:{service_port['port']}"]
    assert config.authz.replicas.targets == config.envoy.replicas
    assert config.inference.listen.port == port_number(inference, "inference")
    # the loop between them: usage reports to the sidecar's gRPC port, prompt counts from the server
    assert host_port(config.inference.usage_report.address) == ("127.0.0.1", port_number(authz, "authz-grpc"))
    assert host_port(config.authz.ratelimit.count_url.rsplit("/", 1)[0]) == (
        "127.0.0.1", port_number(inference, "inference"))
    opa_args = container(spec, "opa")["args"]
    assert host_port(opa_args[opa_args.index("--addr") + 1]) == host_port(config.authz.opa.url) == ("127.0.0.1", 8181)
    assert config.envoy.otlp_address == config.telemetry.otlp_endpoint == "jaeger:4317"
    jaeger_ports = {p["port"] for p in find(rendered["cpu-dev"], "Service", "jaeger")["spec"]["ports"]}
    assert {4317, 16686} <= jaeger_ports


def test_container_commands_are_the_kernelgate_cli(rendered):
    spec = pod_spec(rendered["gpu"])
    for name, sub in (("inference", "serve"), ("kernelgate-authz", "authz")):
        cont = container(spec, name)
        assert cont["command"] + cont["args"] == ["kernelgate", sub, "--config", "/etc/kernelgate/kernelgate.yaml"]
    assert container(spec, "envoy")["args"] == ["-c", "/etc/envoy/envoy.yaml"]
    opa_args = container(spec, "opa")["args"]
    assert opa_args[:4] == ["run", "--server", "--addr", "127.0.0.1:8181"] and opa_args[-1] == "/policies"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_each_programs_health_endpoint(rendered, overlay: str):
    spec = pod_spec(rendered[overlay])
    inference = container(spec, "inference")
    assert inference["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert port_number(inference, inference["readinessProbe"]["httpGet"]["port"]) == 8000
    authz = container(spec, "kernelgate-authz")
    assert authz["readinessProbe"]["grpc"]["port"] == authz["livenessProbe"]["grpc"]["port"] == 9191
    envoy = container(spec, "envoy")
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert port_number(envoy, envoy["readinessProbe"]["httpGet"]["port"]) == 9901
    opa = container(spec, "opa")
    assert opa["readinessProbe"]["httpGet"]["path"] == opa["livenessProbe"]["httpGet"]["path"] == "/health"
    diagnostic = opa["args"][opa["args"].index("--diagnostic-addr") + 1]
    assert host_port(diagnostic) == ("0.0.0.0", port_number(opa, opa["readinessProbe"]["httpGet"]["port"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_downward_api_names_the_pod_for_trace_resources(rendered, overlay: str):
    spec = pod_spec(rendered[overlay])
    for name in ("inference", "kernelgate-authz"):
        refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                for e in container(spec, name)["env"] if "valueFrom" in e}
        assert refs == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                        "NODE_NAME": "spec.nodeName"}


# --- hardening --------------------------------------------------------------------------

LOCKED_DOWN = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
               "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(rendered, overlay: str):
    for ref, cont, spec in all_containers(rendered[overlay]):
        context = cont.get("securityContext", {})
        assert {k: context.get(k) for k in LOCKED_DOWN} == LOCKED_DOWN, ref
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec.get("automountServiceAccountToken") is False, ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_and_resources(rendered, overlay: str):
    for ref, cont, _ in all_containers(rendered[overlay]):
        assert "readinessProbe" in cont and "livenessProbe" in cont, ref
        assert {"cpu", "memory"} <= set(cont["resources"]["requests"]), ref
        assert {"cpu", "memory"} <= set(cont["resources"]["limits"]), ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_emptydirs_are_writable(rendered, overlay: str):
    for ref, cont, spec in all_containers(rendered[overlay]):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in cont.get("volumeMounts", []):
            if "emptyDir" not in volumes[mount["name"]]:
                assert mount.get("readOnly") is True, f"{ref}: {mount['mountPath']} is writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_envoys_port_and_the_replicas(rendered, overlay: str):
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    pod_labels = find(docs, "Deployment", "kernelgate")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    # Envoy's listener for anyone; the inference server only for other kernelgate pods (the replicas).
    assert spec["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]},
                               {"from": [{"podSelector": {"matchLabels": spec["podSelector"]["matchLabels"]}}],
                                "ports": [{"port": 8000, "protocol": "TCP"}]}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_exposes_only_envoy(rendered, overlay: str):
    docs = rendered[overlay]
    service = find(docs, "Service", "kernelgate")["spec"]
    envoy = container(pod_spec(docs), "envoy")
    assert [port_number(envoy, p["targetPort"]) for p in service["ports"]] == [8080]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_covers_the_pods(rendered, overlay: str):
    docs = rendered[overlay]
    pdb = find(docs, "PodDisruptionBudget", "kernelgate")["spec"]
    pod_labels = find(docs, "Deployment", "kernelgate")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb.get("maxUnavailable") == 1


def test_gpu_overlay_asks_for_one_gpu(rendered):
    inference = container(pod_spec(rendered["gpu"]), "inference")
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container_env(inference)["KERNELGATE__INFERENCE__MODEL__DEVICE"] == "cuda"
    for doc in rendered["cpu-dev"]:
        assert "nvidia.com/gpu" not in json.dumps(doc)


def test_cpu_dev_overlay_runs_the_tiny_model_on_cpu(rendered):
    env = container_env(container(pod_spec(rendered["cpu-dev"]), "inference"))
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["KERNELGATE__INFERENCE__MODEL__NAME"] == "tiny-gpt2"
    assert env["KERNELGATE__INFERENCE__MODEL__DEVICE"] == "cpu"


# --- the cpu-dev pod, run on loopback -------------------------------------------------
#
# All four containers; the upstream is the real inference server (`kernelgate serve`), not
# the echo upstream. Each runs its own command, args, env and mounted files (written from
# the rendered ConfigMaps and Secret in the kubelet's layout, ..data symlinks included; OPA
# fails on that layout without --ignore=.*). What differs
# from the pod: in-container paths point at those local copies, the programs come from
# the venv instead of the images, and every pod port is moved to a free loopback port
# (args and KERNELGATE__* env for the kernelgate config, socket addresses for Envoy's
# bootstrap), so the test never collides with anything else on the machine.

ADDRESS = re.compile(r"(?P<scheme>[a-z]+://)?(?P<host>[A-Za-z0-9.\-]+):(?P<port>\d{2,5})(?=$|/)")
IMAGE_PROGRAMS = {"envoyproxy/envoy": "envoy", "openpolicyagent/opa": "opa"}
FIELD_VALUES = {"metadata.name": "kernelgate-e2e", "metadata.namespace": "kernelgate", "spec.nodeName": "localhost"}


def write_kubelet_volume(directory: Path, files: dict[str, bytes]) -> None:
    """The kubelet's atomic-writer layout: files behind a ``..data`` symlink to a hidden dir."""
    payload = directory / "..2000_01_01_00_00_00.000000001"
    payload.mkdir(parents=True)
    for name, content in files.items():
        (payload / name).write_bytes(content)
        (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data").symlink_to(payload.name)


def volume_files(volume: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, bytes]:
    if "configMap" in volume:
        data = find(docs, "ConfigMap", re.sub(r"-[a-z0-9]{10}$", "", volume["configMap"]["name"]))["data"]
        return {k: v.encode() for k, v in data.items()}
    if "secret" in volume:
        data = find(docs, "Secret", re.sub(r"-[a-z0-9]{10}$", "", volume["secret"]["name"]))["data"]
        return {k: base64.b64decode(v) for k, v in data.items()}
    files: dict[str, bytes] = {}
    for source in volume["projected"]["sources"]:
        files.update(volume_files(source, docs))
    return files


def materialize_volumes(spec: dict[str, Any], docs: list[dict[str, Any]], root: Path) -> dict[str, Path]:
    """Volume name -> local directory holding what the kubelet would mount."""
    local = {}
    for volume in spec["volumes"]:
        directory = root / volume["name"]
        if "emptyDir" in volume:
            directory.mkdir(parents=True)
        else:
            write_kubelet_volume(directory, volume_files(volume, docs))
        local[volume["name"]] = directory
    return local


def local_paths(cont: dict[str, Any], volumes: dict[str, Path]) -> dict[str, str]:
    """In-container mount path -> local directory, for this container's mounts."""
    return {m["mountPath"]: str(volumes[m["name"]]) for m in cont.get("volumeMounts", [])}


def swap_paths(value: str, paths: dict[str, str]) -> str:
    for mount_path, local in sorted(paths.items(), key=lambda item: -len(item[0])):
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path):]
    return value


def swap_address(value: str, ports: dict[int, int]) -> str:
    """``host:port`` (or ``scheme://host:port``) of a pod port -> the same on its loopback port."""
    def repl(match: re.Match[str]) -> str:
        port = int(match["port"])
        return f"{match['scheme'] or ''}127.0.0.1:{ports[port]}" if port in ports else match[0]
    return ADDRESS.sub(repl, value)


def config_overrides(data: Any, ports: dict[int, int], path: tuple[str, ...] = ()) -> dict[str, str]:
    """KERNELGATE__* variables moving every address in the config file to its loopback port."""
    env: dict[str, str] = {}
    if isinstance(data, dict) and set(data) == {"host", "port"} and data["port"] in ports:
        return {env_name(path + ("host",)): "127.0.0.1", env_name(path + ("port",)): str(ports[data["port"]])}
    if isinstance(data, dict):
        for key, value in data.items():
            env.update(config_overrides(value, ports, path + (key,)))
    elif isinstance(data, str) and swap_address(data, ports) != data:
        env[env_name(path)] = swap_address(data, ports)
    return env


def env_name(path: tuple[str, ...]) -> str:
    return "KERNELGATE__" + "__".join(p.upper() for p in path)


def remap_socket_addresses(node: Any, ports: dict[int, int]) -> Any:
    """Envoy's bootstrap with each pod port's socket address on its loopback port."""
    if isinstance(node, list):
        return [remap_socket_addresses(v, ports) for v in node]
    if not isinstance(node, dict):
        return node
    if "portValue" in node and node["portValue"] in ports:
        return {**node, "address": "127.0.0.1", "portValue": ports[node["portValue"]]}
    return {k: remap_socket_addresses(v, ports) for k, v in node.items()}


def config_ports(data: Any) -> set[int]:
    """Ports named in the config file: in ``host:port`` strings and ``{host, port}`` sections."""
    if isinstance(data, dict) and set(data) == {"host", "port"}:
        return {data["port"]}
    if isinstance(data, dict):
        return set().union(*(config_ports(v) for v in data.values()))
    return {int(m["port"]) for m in ADDRESS.finditer(data)} if isinstance(data, str) else set()


def pod_ports(spec: dict[str, Any], config: dict[str, Any]) -> dict[int, int]:
    """Every port the pod uses (declared, in args, in the config) -> a free loopback port."""
    found = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    found |= {int(m["port"]) for c in spec["containers"] for a in c.get("args", []) for m in ADDRESS.finditer(a)}
    return {port: free_port() for port in sorted(found | config_ports(config))}


def program(cont: dict[str, Any], paths: dict[str, str], ports: dict[int, int]) -> list[str]:
    """The container's command line with the local binary, local paths and loopback ports."""
    image = cont["image"].rsplit(":", 1)[0]
    command = cont.get("command") or [IMAGE_PROGRAMS[image]]
    args = [swap_address(swap_paths(a, paths), ports) for a in cont.get("args", [])]
    return [find_binary(command[0])] + command[1:] + args


def program_env(cont: dict[str, Any], paths: dict[str, str]) -> dict[str, str]:
    env = {}
    for item in cont.get("env", []):
        value = item["value"] if "value" in item else FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = swap_paths(value, paths)
    return env


def wait_ready(cont: dict[str, Any], ports: dict[int, int], proc: Proc, timeout: float = 60) -> None:
    """Run the container's readiness probe against its loopback port until it passes."""
    probe = cont["readinessProbe"]
    if "grpc" in probe:
        wait_grpc_serving(ports[probe["grpc"]["port"]], proc, timeout)
    else:
        port = ports[port_number(cont, probe["httpGet"]["port"])]
        wait_http(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", proc=proc, timeout=timeout)


def wait_grpc_serving(port: int, proc: Proc, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.log_tail()}"
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"{proc.name}: gRPC health not SERVING after {timeout}s\n{proc.log_tail()}")


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def cpu_dev_pod(rendered, tmp_path: Path) -> Iterator[str]:
    """OPA, the real inference server (`kernelgate serve`, tiny-gpt2 on CPU), the authz sidecar
    and Envoy, each from the cpu-dev pod spec, each started once the previous one's
    readiness probe passes; yields Envoy's URL."""
    docs = rendered["cpu-dev"]
    spec = pod_spec(docs)
    volumes = materialize_volumes(spec, docs, tmp_path / "volumes")
    config = yaml.safe_load((volumes["kernelgate-config"] / "kernelgate.yaml").read_text())
    ports = pod_ports(spec, config)
    bootstrap = (volumes["envoy-bootstrap"] / "envoy.yaml").resolve()
    bootstrap.write_text(yaml.safe_dump(remap_socket_addresses(yaml.safe_load(bootstrap.read_text()), ports),
                                        sort_keys=False))
    overrides = config_overrides(config, ports)
    started: list[Proc] = []
    try:
        for name in ("opa", "inference", "kernelgate-authz", "envoy"):
            cont = container(spec, name)
            paths = local_paths(cont, volumes)
            args = program(cont, paths, ports)
            if name == "envoy":
                args.append("--use-dynamic-base-id")  # other Envoys may run on this machine
            env = {**program_env(cont, paths), **(overrides if cont.get("command") == ["kernelgate"] else {})}
            started.append(start(name, args, tmp_path / "logs", env=env))
            wait_ready(cont, ports, started[-1], timeout=240 if name == "inference" else 60)
        yield f"http://127.0.0.1:{ports[8080]}"
    finally:
        for proc in reversed(started):
            proc.stop()


def test_cpu_dev_pod_serves_a_completion_through_envoy_on_loopback(cpu_dev_pod: str):
    completion = {"model": "tiny-gpt2", "prompt": "Hello, kernelgate", "max_tokens": 8}
    status, body = post(f"{cpu_dev_pod}/v1/completions", completion, {"x-api-key": DEMO_KEY})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny-gpt2"
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    status, body = post(f"{cpu_dev_pod}/v1/completions", completion, {})
    assert status == 401, body


def test_loopback_rewrites_touch_only_ports_and_paths():
    ports = {8181: 40001, 4317: 40002, 8000: 40003}
    assert swap_address("http://127.0.0.1:8181", ports) == "http://127.0.0.1:40001"
    assert swap_address("jaeger:4317", ports) == "127.0.0.1:40002"
    assert swap_address("redis://127.0.0.1:6379/0", ports) == "redis://127.0.0.1:6379/0"
    assert config_overrides({"inference": {"listen": {"host": "0.0.0.0", "port": 8000}},
                             "authz": {"opa": {"url": "http://127.0.0.1:8181"}, "drain_s": 10}}, ports) == {
        "KERNELGATE__INFERENCE__LISTEN__HOST": "127.0.0.1", "KERNELGATE__INFERENCE__LISTEN__PORT": "40003",
        "KERNELGATE__AUTHZ__OPA__URL": "http://127.0.0.1:40001"}
    assert swap_paths("/etc/envoy/envoy.yaml", {"/etc/envoy": "/tmp/v/envoy-bootstrap", "/etc": "/x"}) == \
        "/tmp/v/envoy-bootstrap/envoy.yaml"
    bootstrap = render(EnvoyConfig(upstream_address="127.0.0.1:8000", otlp_address="jaeger:4317"))
    moved = json.dumps(remap_socket_addresses(bootstrap, ports))
    assert '"portValue": 8000' not in moved and '"address": "jaeger"' not in moved and "40003" in moved
