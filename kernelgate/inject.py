"""``kernelgate inject``: put kernelgate in front of the workloads of a manifest.

Like ``istioctl kube-inject``, it rewrites manifests rather than relying on a webhook:
each Deployment, StatefulSet, DaemonSet, ReplicaSet and Pod gets the authz sidecar,
Envoy and OPA (the same containers as ``k8s/base``), their volumes and an Envoy bootstrap
ConfigMap whose upstream is the app's first containerPort, plus a NetworkPolicy so other
pods reach the pod only through Envoy's 8080. The app's own containers are not touched.

The injected pod mounts three objects the namespace must already hold (created once per
namespace, see docs/kubernetes.md): ConfigMaps ``kernelgate-config`` and
``kernelgate-policies`` and Secret ``kernelgate-secrets``.

Injected pod templates carry ``kernelgate.io/injected: "true"``, so a second run changes
nothing; ``kernelgate.io/inject: "false"`` opts a workload out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

from common.ports import (AUTHZ_METRICS_PORT, AUTHZ_PORT, ENVOY_ADMIN_PORT, ENVOY_PORT, OPA_DIAGNOSTIC_PORT, OPA_PORT,
                          OTLP_GRPC_PORT, loopback)
from common.version import __version__
from kernelgate.envoy_config import EnvoyConfig, render

INJECT_ANNOTATION = "kernelgate.io/inject"
INJECTED_ANNOTATION = "kernelgate.io/injected"

KERNELGATE_IMAGE = f"ghcr.io/kernelgate/kernelgate:{__version__}"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
OPA_IMAGE = "openpolicyagent/opa:1.19.1-static"
RUN_AS_ID = 65532

CONFIG_MAP = "kernelgate-config"
POLICIES_CONFIG_MAP = "kernelgate-policies"
SECRET = "kernelgate-secrets"

OTLP_ADDRESS = f"jaeger:{OTLP_GRPC_PORT}"

# Ports the injected containers bind inside the pod's shared network namespace.
RESERVED_PORTS = {
    ENVOY_PORT: "Envoy's listener",
    ENVOY_ADMIN_PORT: "Envoy's admin",
    AUTHZ_PORT: "the authz sidecar",
    AUTHZ_METRICS_PORT: "the authz sidecar's metrics",
    OPA_PORT: "OPA",
    OPA_DIAGNOSTIC_PORT: "OPA's health endpoint",
}

# Where each injectable kind keeps its pod spec.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
}

# Workload kinds that are known and deliberately not injected.
REFUSED_KINDS = {
    "Job": "a Job's pod must finish, and kernelgate's sidecars serve until stopped",
    "CronJob": "a CronJob's pods must finish, and kernelgate's sidecars serve until stopped",
    "ReplicationController": "ReplicationController is deprecated: use a Deployment",
}


class InjectError(Exception):
    """The manifest holds something kernelgate cannot inject; the message names each object."""


@dataclass(frozen=True)
class Workload:
    """One injectable object and where its pod lives inside it."""

    obj: dict[str, Any]
    pod_path: tuple[str, ...]

    @property
    def ref(self) -> str:
        return object_ref(self.obj)

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def namespace(self) -> str | None:
        return self.obj["metadata"].get("namespace")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return _get(self.obj, self.pod_path) or {}

    @property
    def pod_metadata(self) -> dict[str, Any]:
        return _get(self.obj, self.pod_path[:-1] + ("metadata",)) or {}


# --- the stream ---------------------------------------------------------------------


def inject_stream(text: str) -> str:
    """Multi-document YAML in, multi-document YAML out; objects other than workloads pass through."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise InjectError(f"input is not valid YAML: {exc}") from None
    out: list[Any] = []
    errors: list[str] = []
    for index, doc in enumerate(docs):
        try:
            out.extend(inject_object(doc, index))
        except InjectError as exc:
            errors.append(str(exc))
    if errors:
        raise InjectError("cannot inject:\n  " + "\n  ".join(errors))
    return dump_documents(out)


def inject_object(doc: Any, index: int = 0) -> list[dict[str, Any]]:
    """The object itself (injected or not) followed by any objects its injection needs."""
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
        raise InjectError(f"document {index + 1}: not a Kubernetes object (no apiVersion/kind)")
    doc = applyable(doc)
    if doc["kind"] == "List":
        return [_inject_list(doc)]
    if opted_out(doc):
        return [doc]
    workload = as_workload(doc)
    if workload is None or already_injected(workload):
        return [doc]
    injected = copy.deepcopy(doc)
    target = Workload(injected, workload.pod_path)
    port = check_injectable(workload)
    add_sidecars(target, port)
    return [injected, envoy_config_map(target, port), network_policy(target)]


def applyable(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without ``metadata.managedFields``: a live object (``kubectl get -o yaml``) carries
    the server's field-ownership records, and the API server refuses an apply that sends them
    ("metadata.managedFields must be nil"). Everything else is kept as read."""
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or "managedFields" not in metadata:
        return doc
    return {**doc, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}


def _inject_list(doc: dict[str, Any]) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for index, item in enumerate(doc.get("items") or []):
        items.extend(inject_object(item, index))
    return {**doc, "items": items}


def as_workload(doc: dict[str, Any]) -> Workload | None:
    """The workload view of ``doc``, None for kinds without pods; unknown pod carriers are refused."""
    kind, ref = doc["kind"], object_ref(doc)
    if kind in REFUSED_KINDS:
        raise InjectError(f"{ref}: not injectable: {REFUSED_KINDS[kind]}")
    if kind in POD_SPEC_PATHS:
        if not (doc.get("metadata") or {}).get("name"):
            raise InjectError(f"{ref}: has no metadata.name")
        return Workload(doc, POD_SPEC_PATHS[kind])
    if _carries_pods(doc):
        raise InjectError(f"{ref}: unknown workload kind {kind!r} (injectable: {', '.join(POD_SPEC_PATHS)})")
    return None


def object_ref(doc: dict[str, Any]) -> str:
    """``kind/name``: how every message names an object."""
    return f"{doc['kind']}/{(doc.get('metadata') or {}).get('name') or '<unnamed>'}"


def _carries_pods(doc: dict[str, Any]) -> bool:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return False
    return "containers" in spec or isinstance(spec.get("template"), dict) or "jobTemplate" in spec


def opted_out(doc: dict[str, Any]) -> bool:
    """``kernelgate.io/inject: "false"`` on the object or on its pod template."""
    template_metadata = _get(doc, ("spec", "template", "metadata")) or {}
    return any(str((metadata.get("annotations") or {}).get(INJECT_ANNOTATION, "")).lower() == "false"
               for metadata in (doc.get("metadata") or {}, template_metadata))


def already_injected(workload: Workload) -> bool:
    """What makes a second run a no-op."""
    return str((workload.pod_metadata.get("annotations") or {}).get(INJECTED_ANNOTATION, "")).lower() == "true"


# --- checks -------------------------------------------------------------------------


def check_injectable(workload: Workload) -> int:
    """The app port Envoy will route to, or InjectError naming what stands in the way."""
    spec = workload.pod_spec
    containers = spec.get("containers") or []
    if not containers:
        raise InjectError(f"{workload.ref}: has no containers")
    if spec.get("hostNetwork"):
        raise InjectError(f"{workload.ref}: uses hostNetwork; the sidecars would bind ports on the node")
    if not workload.pod_metadata.get("labels"):
        raise InjectError(f"{workload.ref}: its pods have no labels, so no NetworkPolicy can keep "
                          "their ports behind Envoy; add a label")
    _check_names(workload, "container", [c.get("name") for c in containers + (spec.get("initContainers") or [])],
                 {c["name"] for c in sidecar_containers()})
    _check_names(workload, "volume", [v.get("name") for v in spec.get("volumes") or []],
                 {v["name"] for v in sidecar_volumes(workload.name)})
    _check_ports(workload, containers)
    return app_port(workload, containers)


def _check_names(workload: Workload, what: str, used: list[Any], ours: set[str]) -> None:
    clash = sorted(ours.intersection(n for n in used if n))
    if clash:
        raise InjectError(f"{workload.ref}: {what} name {clash[0]!r} is also used by kernelgate's sidecars")


def _check_ports(workload: Workload, containers: list[dict[str, Any]]) -> None:
    sidecar_port_names = {p["name"] for c in sidecar_containers() for p in c["ports"]}
    for container in containers:
        for port in container.get("ports") or []:
            number = port.get("containerPort")
            if number in RESERVED_PORTS:
                raise InjectError(f"{workload.ref}: container {container.get('name')!r} uses port {number}, "
                                  f"which {RESERVED_PORTS[number]} needs in the pod")
            if port.get("name") in sidecar_port_names:
                raise InjectError(f"{workload.ref}: container {container.get('name')!r} names a port "
                                  f"{port['name']!r}, a name kernelgate's sidecars use")


def app_port(workload: Workload, containers: list[dict[str, Any]]) -> int:
    """The app's first TCP containerPort: what Envoy forwards allowed requests to."""
    for container in containers:
        for port in container.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP" and isinstance(port.get("containerPort"), int):
                return port["containerPort"]
    raise InjectError(f"{workload.ref}: declares no TCP containerPort for Envoy to route to")


# --- what is added ------------------------------------------------------------------


def add_sidecars(workload: Workload, port: int) -> None:
    """Append the sidecar containers and volumes and mark the pod as injected (in place)."""
    spec = workload.pod_spec
    spec["containers"] = list(spec["containers"]) + sidecar_containers()
    spec["volumes"] = list(spec.get("volumes") or []) + sidecar_volumes(workload.name)
    metadata = _ensure(workload.obj, workload.pod_path[:-1] + ("metadata",))
    metadata["annotations"] = {**(metadata.get("annotations") or {}), INJECTED_ANNOTATION: "true",
                               "kernelgate.io/upstream-port": str(port)}


def envoy_settings(port: int) -> EnvoyConfig:
    """k8s/base's Envoy settings, with the app's port as the upstream."""
    return EnvoyConfig(listen_host="0.0.0.0", listen_port=ENVOY_PORT, admin_host="0.0.0.0",
                       admin_port=ENVOY_ADMIN_PORT, authz_address=loopback(AUTHZ_PORT),
                       upstream_address=loopback(port), otlp_address=OTLP_ADDRESS)


def envoy_config_map_name(workload_name: str) -> str:
    return f"{workload_name}-kernelgate-envoy"


def envoy_config_map(workload: Workload, port: int) -> dict[str, Any]:
    """The bootstrap exactly as ``kernelgate envoy-config`` would print it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _object_metadata(workload, envoy_config_map_name(workload.name)),
        "data": {"envoy.yaml": yaml.safe_dump(render(envoy_settings(port)), sort_keys=False)},
    }


def network_policy(workload: Workload) -> dict[str, Any]:
    """Other pods reach the injected pods on Envoy's port only, never the app's own port."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _object_metadata(workload, f"{workload.name}-kernelgate-ingress"),
        "spec": {
            "podSelector": {"matchLabels": dict(workload.pod_metadata["labels"])},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": ENVOY_PORT, "protocol": "TCP"}]}],
        },
    }


def _object_metadata(workload: Workload, name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if workload.namespace:
        metadata["namespace"] = workload.namespace
    metadata["labels"] = {"app.kubernetes.io/managed-by": "kernelgate-inject",
                          "kernelgate.io/workload": workload.name[:63].rstrip("-_.")}
    return metadata


# --- the containers (the same as k8s/base/deployment.yaml's) -----------------------


def sidecar_containers() -> list[dict[str, Any]]:
    return [authz_container(), envoy_container(), opa_container()]


def authz_container() -> dict[str, Any]:
    return {
        "name": "kernelgate-authz",
        "image": KERNELGATE_IMAGE,
        "command": ["kernelgate"],
        "args": ["authz", "--config", "/etc/kernelgate/kernelgate.yaml"],
        "ports": [{"name": "authz-grpc", "containerPort": AUTHZ_PORT},
                  {"name": "authz-metrics", "containerPort": AUTHZ_METRICS_PORT}],
        "env": downward_env() + [{"name": "HOME", "value": "/tmp"}],
        "readinessProbe": {"grpc": {"port": AUTHZ_PORT}, "periodSeconds": 5},
        "livenessProbe": {"grpc": {"port": AUTHZ_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": _resources("250m", "256Mi", "1", "512Mi"),
        "securityContext": security_context(),
        "volumeMounts": [{"name": "kernelgate-config", "mountPath": "/etc/kernelgate", "readOnly": True},
                         {"name": "authz-tmp", "mountPath": "/tmp"}],
    }


def envoy_container() -> dict[str, Any]:
    ready = {"httpGet": {"path": "/ready", "port": "envoy-admin"}}
    return {
        "name": "envoy",
        "image": ENVOY_IMAGE,
        "args": ["-c", "/etc/envoy/envoy.yaml"],
        "ports": [{"name": "envoy-http", "containerPort": ENVOY_PORT},
                  {"name": "envoy-admin", "containerPort": ENVOY_ADMIN_PORT}],
        "readinessProbe": {**ready, "periodSeconds": 5},
        "livenessProbe": {**copy.deepcopy(ready), "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "resources": _resources("250m", "128Mi", "1", "512Mi"),
        "securityContext": security_context(),
        "volumeMounts": [{"name": "envoy-bootstrap", "mountPath": "/etc/envoy", "readOnly": True}],
    }


def opa_container() -> dict[str, Any]:
    health = {"httpGet": {"path": "/health", "port": "opa-diagnostic"}}
    return {
        "name": "opa",
        "image": OPA_IMAGE,
        "args": ["run", "--server", "--addr", loopback(OPA_PORT),
                 "--diagnostic-addr", f"0.0.0.0:{OPA_DIAGNOSTIC_PORT}",
                 "--ignore", ".*", "--log-level", "error", "/policies"],
        "ports": [{"name": "opa-diagnostic", "containerPort": OPA_DIAGNOSTIC_PORT}],
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**copy.deepcopy(health), "periodSeconds": 10, "failureThreshold": 3},
        "resources": _resources("100m", "128Mi", "500m", "512Mi"),
        "securityContext": security_context(),
        "volumeMounts": [{"name": "opa-policies", "mountPath": "/policies", "readOnly": True}],
    }


def sidecar_volumes(workload_name: str) -> list[dict[str, Any]]:
    """Secrets are world-readable inside the pod: the app's pod may set no fsGroup."""
    return [
        {"name": "kernelgate-config", "projected": {"defaultMode": 0o444, "sources": [
            {"configMap": {"name": CONFIG_MAP}}, {"secret": {"name": SECRET}}]}},
        {"name": "envoy-bootstrap", "configMap": {"name": envoy_config_map_name(workload_name)}},
        {"name": "opa-policies", "configMap": {"name": POLICIES_CONFIG_MAP}},
        {"name": "authz-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]


def security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def downward_env() -> list[dict[str, Any]]:
    """Pod, namespace and node names: resource attributes of the sidecar's spans."""
    fields = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "NODE_NAME": "spec.nodeName"}
    return [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in fields.items()]


def _resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


# --- YAML ---------------------------------------------------------------------------


class _BlockStringDumper(yaml.SafeDumper):
    """Multi-line strings (the Envoy bootstrap) as literal blocks, readable in a diff."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStringDumper.add_representer(str, _represent_str)


def dump_documents(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockStringDumper, sort_keys=False, default_flow_style=False,
                         explicit_start=True, allow_unicode=True)


def _ensure(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    return obj


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj
