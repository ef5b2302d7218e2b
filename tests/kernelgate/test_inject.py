"""``kernelgate inject``: what it adds validates and matches k8s/base, a second run changes
nothing, opted-out and non-workload objects pass through, and what it cannot inject is
refused with the object's kind/name."""

from __future__ import annotations

import copy
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.processes import ROOT, find_binary
from kernelgate.config import load
from kernelgate.envoy_config import render
from kernelgate.inject import InjectError, envoy_settings, inject_stream

BASE = ROOT / "k8s" / "base"
SIDECARS = ("kernelgate-authz", "envoy", "opa")


def pod_template(labels: dict[str, str], containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"labels": labels}, "spec": {"containers": containers}}


def web_container(port: int = 8000, name: str = "web") -> dict[str, Any]:
    return {"name": name, "image": "example/web:1", "ports": [{"name": "web", "containerPort": port}]}


def deployment(name: str = "web", port: int = 8000, **spec: Any) -> dict[str, Any]:
    template = pod_template({"app": name}, [web_container(port)])
    template["spec"].update(spec)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}}, "template": template}}


def statefulset() -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db-api"},
            "spec": {"serviceName": "db-api", "selector": {"matchLabels": {"app": "db-api"}},
                     "template": pod_template({"app": "db-api"}, [web_container(9000, "api")])}}


def daemonset() -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "edge"},
            "spec": {"selector": {"matchLabels": {"app": "edge"}},
                     "template": pod_template({"app": "edge"}, [web_container(7000)])}}


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", "labels": {"app": "solo"}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1",
                                     "ports": [{"containerPort": 5000}, {"containerPort": 5001}]}], **spec}}


def service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]}}


def config_map() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
            "data": {"app.yaml": "a: 1\nb: 2\n"}}


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def injected(*docs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(inject_stream(dump(*docs))))


def by_ref(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def annotations_of(doc: dict[str, Any]) -> dict[str, str]:
    metadata = doc["metadata"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]
    return metadata.get("annotations", {})


APP = (deployment(), statefulset(), daemonset(), pod(), service(), config_map())


# --- what is added ------------------------------------------------------------------------


def test_every_workload_gets_the_sidecars_and_keeps_its_app():
    out = by_ref(injected(*APP))
    for original in APP[:4]:
        ref = f"{original['kind']}/{original['metadata']['name']}"
        spec = spec_of(out[ref])
        assert [c["name"] for c in spec["containers"]] == \
            [c["name"] for c in spec_of(original)["containers"]] + list(SIDECARS), ref
        assert spec["containers"][0] == spec_of(original)["containers"][0], f"{ref}: app container changed"
        assert annotations_of(out[ref])["kernelgate.io/injected"] == "true"
        assert {v["name"] for v in spec["volumes"]} == {"kernelgate-config", "envoy-bootstrap", "opa-policies",
                                                        "authz-tmp"}


def test_other_kinds_pass_through_unchanged():
    out = by_ref(injected(*APP))
    assert out["Service/web"] == service()
    assert out["ConfigMap/settings"] == config_map()


@pytest.mark.parametrize("version", ["1.33", kubernetes_validate.latest_version()])
def test_everything_injected_validates(version: str):
    for doc in injected(*APP):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("workload, port", [(deployment(), 8000), (statefulset(), 9000), (daemonset(), 7000),
                                            (pod(), 5000)])
def test_envoy_routes_to_the_apps_first_port(workload: dict[str, Any], port: int):
    out = by_ref(injected(workload))
    name = workload["metadata"]["name"]
    config_map = out[f"ConfigMap/{name}-kernelgate-envoy"]
    assert config_map["metadata"].get("namespace") == workload["metadata"].get("namespace")
    volume = next(v for v in spec_of(out[f"{workload['kind']}/{name}"])["volumes"] if v["name"] == "envoy-bootstrap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    clusters = yaml.safe_load(config_map["data"]["envoy.yaml"])["staticResources"]["clusters"]
    upstream = next(c for c in clusters if c["name"] == "inference")
    address = upstream["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
    assert address == {"address": "127.0.0.1", "portValue": port}


def test_injected_bootstrap_is_k8s_bases_with_the_apps_port():
    # k8s/base balances over every pod's inference server (the headless Service); an injected
    # app is one upstream, on the pod's loopback. Everything else is the same bootstrap.
    base = replace(load(BASE / "kernelgate.yaml", environ={}).envoy, upstream_addresses=[])
    out = by_ref(injected(deployment(port=8000)))
    assert envoy_settings(8000) == base
    assert out["ConfigMap/web-kernelgate-envoy"]["data"]["envoy.yaml"] == \
        yaml.safe_dump(render(base), sort_keys=False)


def test_envoy_accepts_the_injected_bootstrap(tmp_path: Path):
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(by_ref(injected(statefulset()))["ConfigMap/db-api-kernelgate-envoy"]["data"]["envoy.yaml"])
    out = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(bootstrap), "--use-dynamic-base-id"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_injected_containers_are_k8s_bases_containers():
    base = yaml.safe_load((BASE / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    out = spec_of(by_ref(injected(deployment()))["Deployment/web"])["containers"]
    for name in SIDECARS:
        assert next(c for c in out if c["name"] == name) == next(c for c in base if c["name"] == name), name


def test_network_policy_keeps_the_app_port_behind_envoy():
    out = by_ref(injected(deployment()))
    policy = out["NetworkPolicy/web-kernelgate-ingress"]
    assert policy["metadata"]["namespace"] == "shop"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "web"}}
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_every_injected_container_is_locked_down():
    for doc in injected(*APP[:4]):
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Pod"):
            for cont in spec_of(doc)["containers"][-3:]:
                context = cont["securityContext"]
                assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"] == {"drop": ["ALL"]}
                assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_a_list_is_injected_item_by_item():
    out = injected({"apiVersion": "v1", "kind": "List", "items": [deployment(), service()]})
    assert len(out) == 1
    assert [f"{i['kind']}/{i['metadata']['name']}" for i in out[0]["items"]] == [
        "Deployment/web", "ConfigMap/web-kernelgate-envoy", "NetworkPolicy/web-kernelgate-ingress", "Service/web"]


# --- idempotence and opt-out ----------------------------------------------------------------


def test_second_run_is_byte_identical():
    once = inject_stream(dump(*APP))
    assert inject_stream(once) == once


def test_the_base_pod_already_carries_the_sidecars():
    base = (BASE / "deployment.yaml").read_text()
    assert yaml.safe_load(inject_stream(base)) == yaml.safe_load(base)


@pytest.mark.parametrize("where", ["object", "template"])
def test_opt_out_annotation_leaves_the_workload_alone(where: str):
    workload = deployment()
    metadata = workload["metadata"] if where == "object" else workload["spec"]["template"]["metadata"]
    metadata["annotations"] = {"kernelgate.io/inject": "false"}
    assert injected(workload) == [workload]


def test_input_is_not_modified():
    docs = [deployment(), pod()]
    before = copy.deepcopy(docs)
    inject_stream(dump(*docs))
    assert docs == before


# --- refusals -----------------------------------------------------------------------------


def refusal(*docs: Any) -> str:
    with pytest.raises(InjectError) as info:
        inject_stream(dump(*docs))
    return str(info.value)


@pytest.mark.parametrize("port", [8080, 9191, 9192, 8181, 8282, 9901])
def test_refuses_an_app_port_the_sidecars_need(port: int):
    message = refusal(deployment(port=port))
    assert "Deployment/web" in message and f"port {port}" in message


def test_refuses_a_pod_without_containers():
    empty = pod()
    empty["spec"]["containers"] = []
    assert "Pod/solo: has no containers" in refusal(empty)


def test_refuses_an_unknown_workload_kind():
    rollout = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "metadata": {"name": "canary"},
               "spec": {"template": pod_template({"app": "canary"}, [web_container()])}}
    message = refusal(rollout)
    assert "Rollout/canary" in message and "unknown workload kind" in message


@pytest.mark.parametrize("kind", ["Job", "CronJob"])
def test_refuses_pods_that_must_finish(kind: str):
    job = {"apiVersion": "batch/v1", "kind": kind, "metadata": {"name": "nightly"}, "spec": {}}
    assert f"{kind}/nightly: not injectable" in refusal(job)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("ports"), "no TCP containerPort"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(name="envoy"), "container name 'envoy'"),
    (lambda d: d["spec"]["template"]["spec"].update(volumes=[{"name": "opa-policies", "emptyDir": {}}]),
     "volume name 'opa-policies'"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(name="envoy-admin"),
     "port 'envoy-admin'"),
    (lambda d: d["spec"]["template"]["spec"].update(hostNetwork=True), "hostNetwork"),
    (lambda d: d["spec"]["template"]["metadata"].pop("labels"), "no labels"),
])
def test_refuses_what_would_clash_or_leak(change, expected: str):
    workload = deployment()
    change(workload)
    message = refusal(workload)
    assert "Deployment/web" in message and expected in message


def test_refuses_documents_that_are_not_objects():
    assert "document 1: not a Kubernetes object" in refusal(["just", "a", "list"])


def test_every_refusal_is_reported_at_once():
    message = refusal(deployment("a", port=8080), service(), deployment("b", port=9901))
    assert "Deployment/a" in message and "Deployment/b" in message


# --- the CLI --------------------------------------------------------------------------------


def run_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_binary("kernelgate"), "inject", "-f", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_prints_the_injected_manifest(tmp_path: Path):
    manifest = tmp_path / "app.yaml"
    manifest.write_text(dump(*APP))
    out = run_cli(manifest)
    assert out.returncode == 0, out.stderr
    assert out.stdout == inject_stream(dump(*APP))


def test_cli_refusal_names_the_object_and_exits_2(tmp_path: Path):
    manifest = tmp_path / "app.yaml"
    manifest.write_text(dump(deployment(port=8181)))
    out = run_cli(manifest)
    assert out.returncode == 2 and out.stdout == ""
    assert "Deployment/web" in out.stderr and "port 8181" in out.stderr


def test_injected_bootstrap_matches_render():
    assert by_ref(injected(pod()))["ConfigMap/solo-kernelgate-envoy"]["data"]["envoy.yaml"] == \
        yaml.safe_dump(render(envoy_settings(5000)), sort_keys=False)
