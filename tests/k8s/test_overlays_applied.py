"""Both overlays applied to a real API server (server-side apply, strict field validation),
and what it stored: every field as sent, the defaults it filled in, the pods it admits into
a namespace that enforces Pod Security ``restricted``, and what the Service, the
PodDisruptionBudget and the NetworkPolicy select.

No controller runs: a Deployment makes no pods here, so tests create the pod the
ReplicaSet controller would (the Deployment's stored template) and read back what
admission did to it. Nothing schedules or starts it.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import ForbiddenError

from tests.k8s.apiserver import SERVICE_CIDR, Applied, Cluster
from tests.k8s.manifests import K8S, OVERLAYS, container, find, in_namespace, kustomize_build, selector

KERNELGATE_IMAGE = "ghcr.io/kernelgate/kernelgate:0.1.0"


def namespace_of(overlay: str) -> str:
    return f"kernelgate-{overlay}"


@pytest.fixture(scope="module")
def applied(cluster: Cluster) -> dict[str, list[tuple[dict[str, Any], Applied]]]:
    """overlay -> (object sent, what the server answered), in kustomize's order (Namespace first)."""
    result = {}
    for overlay in OVERLAYS:
        docs = in_namespace(kustomize_build(K8S / "overlays" / overlay), namespace_of(overlay))
        result[overlay] = [(doc, cluster.apply(doc)) for doc in docs]
    return result


def stored(applied: dict[str, list[tuple[dict[str, Any], Applied]]], overlay: str, kind: str,
           name: str) -> dict[str, Any]:
    return find([a.stored for _, a in applied[overlay]], kind, name)


def contained(sent: Any, kept: Any, path: str = "") -> list[str]:
    """Where ``kept`` lacks or changes something ``sent`` has (defaults added are fine)."""
    if isinstance(sent, dict):
        if not sent:
            return []
        if not isinstance(kept, dict):
            return [f"{path}: {kept!r} is not a map"]
        # A zero value (false, 0, "") is the Go default, and the server stores it as absent.
        return [p for k, v in sent.items()
                for p in (contained(v, kept[k], f"{path}.{k}") if k in kept
                          else [] if v in (False, 0, "") else [f"{path}.{k}: dropped"])]
    if isinstance(sent, list):
        if not isinstance(kept, list) or len(kept) != len(sent):
            return [f"{path}: {kept!r} != {sent!r}"]
        return [p for i, (s, k) in enumerate(zip(sent, kept)) for p in contained(s, k, f"{path}[{i}]")]
    if ".resources." in path and isinstance(kept, str):   # quantities are stored as strings
        sent = str(sent)
    return [] if sent == kept else [f"{path}: stored {kept!r}, sent {sent!r}"]


# --- accepted and stored as sent ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_stored_as_sent_without_warnings(applied, overlay: str):
    kinds = sorted(doc["kind"] for doc, _ in applied[overlay])
    assert kinds == sorted(["Namespace", "ServiceAccount", "ServiceAccount", "Deployment", "Deployment",
                            "Service", "Service", "Service", "NetworkPolicy", "PodDisruptionBudget",
                            "ConfigMap", "ConfigMap", "ConfigMap", "Secret"])
    for doc, answer in applied[overlay]:
        ref = f"{doc['kind']}/{doc['metadata']['name']}"
        assert answer.stored["metadata"]["uid"], ref
        # Pod Security's warn=restricted checks Deployment templates on apply: no warning means
        # each template meets "restricted" (and no deprecated API or field was used).
        assert answer.warnings == [], f"{ref}: {answer.warnings}"
        if doc["kind"] == "Secret":   # base64 wrapped by kustomize, stored unwrapped
            sent = {k: base64.b64decode(v) for k, v in doc["data"].items()}
            assert {k: base64.b64decode(v) for k, v in answer.stored["data"].items()} == sent, ref
            doc = {**doc, "data": {}}
        assert contained(doc, answer.stored) == [], ref


def test_reapplying_an_overlay_changes_nothing(applied, cluster: Cluster):
    for doc, answer in applied["cpu-dev"]:
        again = cluster.apply(doc)
        assert again.stored["metadata"]["resourceVersion"] == answer.stored["metadata"]["resourceVersion"], \
            f"{doc['kind']}/{doc['metadata']['name']} changed on a second apply"


# --- what the server filled in ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stored_deployment_defaults(applied, overlay: str):
    deployment = stored(applied, overlay, "Deployment", "kernelgate")
    spec = deployment["spec"]
    assert spec["progressDeadlineSeconds"] == 600
    assert spec["revisionHistoryLimit"] == 5
    if overlay == "gpu":    # a rollout replaces pods in place: no spare GPU needed
        assert spec["replicas"] == 2
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    else:
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Always" and pod["dnsPolicy"] == "ClusterFirst"
    assert pod["serviceAccountName"] == "kernelgate" and pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 90
    for cont in pod["containers"]:
        assert cont["imagePullPolicy"] == "IfNotPresent", cont["name"]   # tags, not :latest
        assert cont["terminationMessagePolicy"] == "File"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kernelgate-config"]["projected"]["defaultMode"] == 0o440
    assert volumes["envoy-bootstrap"]["configMap"]["defaultMode"] == 0o644


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stored_probes(applied, overlay: str):
    pod = stored(applied, overlay, "Deployment", "kernelgate")["spec"]["template"]["spec"]
    inference = container(pod, "inference")
    assert inference["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "inference", "scheme": "HTTP"}
    assert inference["startupProbe"]["failureThreshold"] * inference["startupProbe"]["periodSeconds"] == 900
    assert inference["livenessProbe"]["timeoutSeconds"] == 5
    authz = container(pod, "kernelgate-authz")
    # The kubelet's native gRPC probe, asking for the server's overall health ("" service).
    assert authz["readinessProbe"]["grpc"] == {"port": 9191, "service": ""}
    for cont in pod["containers"]:
        for kind in ("readinessProbe", "livenessProbe"):
            probe = cont[kind]
            assert probe["successThreshold"] == 1 and probe["timeoutSeconds"] >= 1, (cont["name"], kind)
    ports = {p["name"]: p for c in pod["containers"] for p in c["ports"]}
    assert all(p["protocol"] == "TCP" for p in ports.values())
    assert ports["envoy-http"]["containerPort"] == 8080


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stored_security_context(applied, overlay: str):
    for name in ("kernelgate", "jaeger"):
        pod = stored(applied, overlay, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for cont in pod["containers"]:
            context = cont["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}, cont["name"]


def test_both_overlays_run_one_image(applied):
    images = {overlay: {c["image"] for c in stored(applied, overlay, "Deployment", "kernelgate")
                        ["spec"]["template"]["spec"]["containers"]} for overlay in OVERLAYS}
    assert KERNELGATE_IMAGE in images["cpu-dev"] and images["cpu-dev"] == images["gpu"]
    inference = container(stored(applied, "gpu", "Deployment", "kernelgate")["spec"]["template"]["spec"],
                          "inference")
    # Extended resources: the server keeps request == limit, whole devices.
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert inference["resources"]["requests"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stored_service_pdb_and_network_policy(applied, overlay: str):
    service = stored(applied, overlay, "Service", "kernelgate")["spec"]
    assert service["type"] == "ClusterIP" and service["sessionAffinity"] == "None"
    assert ipaddress.ip_address(service["clusterIP"]) in ipaddress.ip_network(SERVICE_CIDR)
    assert service["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": "envoy-http"}]
    pdb = stored(applied, overlay, "PodDisruptionBudget", "kernelgate")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    inference = stored(applied, overlay, "Service", "kernelgate-inference")["spec"]
    assert inference["clusterIP"] == "None" and not inference.get("publishNotReadyAddresses")   # headless
    assert inference["ports"] == [{"name": "inference", "port": 8000, "protocol": "TCP", "targetPort": "inference"}]
    policy = stored(applied, overlay, "NetworkPolicy", "kernelgate-ingress")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    # TCP 8080 (Envoy) from any source; TCP 8000 (the inference server) from kernelgate pods
    # only, for the other pods' Envoys. Egress is not restricted.
    assert policy["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}]},
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kernelgate"}}}],
         "ports": [{"port": 8000, "protocol": "TCP"}]}]


# --- pods made from the stored templates -----------------------------------------------------------


def pod_from_template(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    """The pod the ReplicaSet controller would create from this Deployment."""
    template = copy.deepcopy(deployment["spec"]["template"])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**template["metadata"], "name": name, "namespace": deployment["metadata"]["namespace"]},
            "spec": template["spec"]}


@pytest.fixture(scope="module")
def pods(applied, cluster: Cluster) -> dict[tuple[str, str], dict[str, Any]]:
    """(overlay, deployment) -> the pod admitted from its stored template."""
    made = {}
    for overlay in OVERLAYS:
        for name in ("kernelgate", "jaeger"):
            deployment = stored(applied, overlay, "Deployment", name)
            made[(overlay, name)] = cluster.create(pod_from_template(deployment, f"{name}-from-template"))
    return made


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_from_the_templates_pass_pod_security_restricted(applied, pods, overlay: str):
    namespace = stored(applied, overlay, "Namespace", namespace_of(overlay))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in ("kernelgate", "jaeger"):
        pod = pods[(overlay, name)]
        assert pod["status"]["phase"] == "Pending"     # admitted; nothing schedules it here
        # automountServiceAccountToken: false -> admission added no API token volume.
        assert not [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access")], name
        for cont in pod["spec"]["containers"]:
            assert not [m for m in cont.get("volumeMounts", [])
                        if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"], cont["name"]


@pytest.mark.parametrize("change", ["privilege escalation", "root", "capabilities"])
def test_pod_security_enforcement_is_live(applied, cluster: Cluster, change: str):
    """The control for the test above: a weaker copy of the template is refused."""
    pod = pod_from_template(stored(applied, "cpu-dev", "Deployment", "kernelgate"), f"weaker-{change[:4]}")
    envoy = container(pod["spec"], "envoy")["securityContext"]
    if change == "privilege escalation":
        envoy["allowPrivilegeEscalation"] = True
    elif change == "root":
        envoy["runAsNonRoot"] = False
        envoy["runAsUser"] = 0
    else:
        envoy["capabilities"] = {"add": ["NET_ADMIN"]}
    with pytest.raises(ForbiddenError, match="violates PodSecurity"):
        cluster.create(pod)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdb_and_network_policy_select_the_kernelgate_pods_only(applied, pods, cluster: Cluster,
                                                                        overlay: str):
    namespace = namespace_of(overlay)
    kernelgate_pod = pods[(overlay, "kernelgate")]["metadata"]["name"]
    policy = stored(applied, overlay, "NetworkPolicy", "kernelgate-ingress")["spec"]
    selectors = {
        "Service": stored(applied, overlay, "Service", "kernelgate")["spec"]["selector"],
        "Service kernelgate-inference": stored(applied, overlay, "Service", "kernelgate-inference")
        ["spec"]["selector"],
        "PodDisruptionBudget": stored(applied, overlay, "PodDisruptionBudget", "kernelgate")
        ["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": policy["podSelector"]["matchLabels"],
        "NetworkPolicy's port-8000 peers": policy["ingress"][1]["from"][0]["podSelector"]["matchLabels"],
    }
    for kind, labels in selectors.items():
        selected = [p["metadata"]["name"] for p in cluster.list("v1", "Pod", namespace, selector(labels))]
        assert selected == [kernelgate_pod], f"{kind} selects {selected}"
    # The Service's targetPort names a port of the selected pod: Envoy's, 8080.
    pod = pods[(overlay, "kernelgate")]
    target = stored(applied, overlay, "Service", "kernelgate")["spec"]["ports"][0]["targetPort"]
    assert [p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"] if p["name"] == target] \
        == [8080]
