"""``kernelgate inject`` on live objects, as ``kubectl get -o yaml | kernelgate inject -f - |
kubectl apply --server-side -f -`` runs it: the object read back from a real API server
(status, managedFields, resourceVersion and the server's defaults included) goes through the
CLI, the output is applied, and the stored workload carries the sidecars. Running the same
pipeline again changes nothing on the server.

The namespace holds what docs/kubernetes.md says to create once per namespace (the config,
the policies, the Secret), from the same files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.dynamic.exceptions import ConflictError

from common.processes import ROOT, find_binary
from tests.k8s.apiserver import Cluster

NAMESPACE = "shop"
SIDECARS = ["kernelgate-authz", "envoy", "opa"]


def app_objects() -> list[dict[str, Any]]:
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "web", "image": "example/web:1",
                                                       "ports": [{"name": "web", "containerPort": 8000}]}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NAMESPACE},
               "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "envoy-http"}]}}
    return [deployment, service]


def namespace_objects() -> list[dict[str, Any]]:
    """``kubectl create configmap/secret --from-file`` of docs/kubernetes.md, as objects."""
    def files(*paths: str) -> dict[str, str]:
        return {Path(p).name: (ROOT / p).read_text() for p in paths}

    meta = {"namespace": NAMESPACE}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        # What the ServiceAccount controller (not running here) makes in every namespace.
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {**meta, "name": "default"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": "kernelgate-config"},
         "data": files("k8s/base/kernelgate.yaml")},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": "kernelgate-policies"},
         "data": files("policies/authz.rego", "policies/data.json")},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "name": "kernelgate-secrets"},
         "stringData": files("config/api-keys.yaml", "config/jwks.json")},
    ]


def inject(live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The real CLI on the live objects' YAML."""
    out = subprocess.run([find_binary("kernelgate"), "inject", "-f", "-"], input=yaml.safe_dump_all(live),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def live(cluster: Cluster, kind: str, name: str, api_version: str) -> dict[str, Any]:
    return cluster.get(api_version, kind, name, NAMESPACE)


@pytest.fixture(scope="module")
def injected(cluster: Cluster) -> dict[str, Any]:
    for doc in namespace_objects() + app_objects():
        cluster.apply(doc, manager="app-owner")
    before = [live(cluster, "Deployment", "web", "apps/v1"), live(cluster, "Service", "web", "v1")]
    output = inject(before)
    answers = [cluster.apply(doc, manager="kernelgate-inject") for doc in output]
    return {"before": before, "output": output, "answers": answers}


def test_inject_takes_the_live_objects_and_the_server_stores_the_sidecars(injected, cluster: Cluster):
    kinds = [(d["kind"], d["metadata"]["name"]) for d in injected["output"]]
    assert kinds == [("Deployment", "web"), ("ConfigMap", "web-kernelgate-envoy"),
                     ("NetworkPolicy", "web-kernelgate-ingress"), ("Service", "web")]
    assert all(a.warnings == [] for a in injected["answers"]), [a.warnings for a in injected["answers"]]
    deployment = live(cluster, "Deployment", "web", "apps/v1")
    template = deployment["spec"]["template"]
    assert [c["name"] for c in template["spec"]["containers"]] == ["web", *SIDECARS]
    assert template["metadata"]["annotations"]["kernelgate.io/injected"] == "true"
    assert deployment["metadata"]["generation"] == injected["before"][0]["metadata"]["generation"] + 1
    policy = live(cluster, "NetworkPolicy", "web-kernelgate-ingress", "networking.k8s.io/v1")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "web"}
    assert policy["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_every_volume_of_the_injected_pod_names_an_object_in_the_namespace(injected, cluster: Cluster):
    spec = live(cluster, "Deployment", "web", "apps/v1")["spec"]["template"]["spec"]
    names = []
    for volume in spec["volumes"]:
        sources = volume.get("projected", {}).get("sources", [volume])
        names += [("ConfigMap", s["configMap"]["name"]) for s in sources if "configMap" in s]
        names += [("Secret", s["secret"].get("secretName") or s["secret"]["name"]) for s in sources if "secret" in s]
    assert ("ConfigMap", "web-kernelgate-envoy") in names and ("Secret", "kernelgate-secrets") in names
    for kind, name in names:
        assert live(cluster, kind, name, "v1")["metadata"]["name"] == name
    # And the pod the ReplicaSet controller would make from it is admitted.
    template = spec
    pod = cluster.create({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": "web-from-template", "namespace": NAMESPACE,
                                       "labels": {"app": "web"}},
                          "spec": template})
    assert [c["name"] for c in pod["spec"]["containers"]] == ["web", *SIDECARS]


def pipeline(cluster: Cluster) -> list[dict[str, Any]]:
    """``kubectl get deploy,svc web -o yaml | kernelgate inject -f - | kubectl apply --server-side -f -``"""
    current = [live(cluster, "Deployment", "web", "apps/v1"), live(cluster, "Service", "web", "v1")]
    output = inject(current)
    # Only the server's field-ownership records are dropped (an apply may not send them).
    assert output == [{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "managedFields"}}
                      for d in current], "inject changed an injected live object"
    return [cluster.apply(doc, manager="kernelgate-inject").stored for doc in output]


def test_running_the_pipeline_again_is_a_no_op(injected, cluster: Cluster):
    before = live(cluster, "Deployment", "web", "apps/v1")
    once = pipeline(cluster)[0]
    # The first run back may only record who owns the defaults the server filled in.
    assert once["spec"] == before["spec"] and once["metadata"]["generation"] == before["metadata"]["generation"]
    twice = pipeline(cluster)[0]
    assert twice["metadata"]["resourceVersion"] == once["metadata"]["resourceVersion"]


def test_a_stale_output_is_refused_not_applied(injected, cluster: Cluster):
    """inject keeps the resourceVersion it read: an output applied after the object changed
    is refused (409) instead of overwriting the newer object."""
    with pytest.raises(ConflictError):
        cluster.apply(injected["output"][0], manager="kernelgate-inject")
