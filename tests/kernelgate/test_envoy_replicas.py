"""The Envoy bootstrap for N inference replicas and other models' clusters, and the config that feeds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from common.replicas import NOT_STARTED_HEADER
from kernelgate.config import load
from kernelgate.envoy_config import EnvoyConfig, render
from common.settings import ConfigError, build
from kernelgate.stack import replica_envs
from tests.procs import envoy_validate


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "kernelgate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def clusters(bootstrap: dict) -> dict[str, dict]:
    return {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}


def routes(bootstrap: dict) -> list[dict]:
    hcm = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    return hcm["routeConfig"]["virtualHosts"][0]["routes"]


def test_replicas_become_one_least_request_cluster_with_health_checks_outliers_and_breakers() -> None:
    cfg = build(EnvoyConfig, {"upstream_addresses": ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]}, "envoy")
    inference = clusters(render(cfg))["inference"]
    assert inference["lbPolicy"] == "LEAST_REQUEST" and inference["type"] == "STATIC"
    hosts = [e["endpoint"]["address"]["socketAddress"]["portValue"]
             for e in inference["loadAssignment"]["endpoints"][0]["lbEndpoints"]]
    assert hosts == [8000, 8001, 8002]
    [check] = inference["healthChecks"]
    assert check["httpHealthCheck"]["path"] == "/readyz" and check["noTrafficInterval"] == check["interval"]
    assert inference["outlierDetection"]["consecutive5xx"] == 3
    thresholds = inference["circuitBreakers"]["thresholds"][0]
    assert thresholds["maxRequests"] == 4096 and thresholds["retryBudget"]["minRetryConcurrency"] == 32


def test_only_requests_that_never_started_are_retried_and_on_another_replica() -> None:
    [route] = routes(render(EnvoyConfig()))
    retry = route["route"]["retryPolicy"]
    assert set(retry["retryOn"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request",
                                                "retriable-headers"}
    assert "5xx" not in retry["retryOn"] and "reset," not in retry["retryOn"] + ","
    assert retry["retriableHeaders"] == [{"name": NOT_STARTED_HEADER, "presentMatch": True}]
    assert retry["retryHostPredicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_other_models_get_their_own_cluster_routed_by_the_policy_header() -> None:
    cfg = build(EnvoyConfig, {"upstream_address": "127.0.0.1:8000",
                              "model_upstreams": {"tiny-gpt2": ["127.0.0.1:9000"]}}, "envoy")
    bootstrap = render(cfg)
    assert set(clusters(bootstrap)) >= {"inference", "inference_tiny_gpt2"}
    first, default = routes(bootstrap)
    assert first["match"]["headers"] == [{"name": "x-kernelgate-model", "stringMatch": {"exact": "tiny-gpt2"}}]
    assert first["route"]["cluster"] == "inference_tiny_gpt2" and default["route"]["cluster"] == "inference"
    hcm = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    ext_authz = hcm["httpFilters"][0]["typedConfig"]
    assert ext_authz["clearRouteCache"] is True, "the policy's header must be able to pick the route"
    assert "clearRouteCache" not in json.dumps(render(EnvoyConfig())), "no re-routing cost without other models"


def test_access_log_names_the_upstream_host() -> None:
    hcm = render(EnvoyConfig(access_log_path="/tmp/x.log"))["staticResources"]["listeners"][0]["filterChains"][0][
        "filters"][0]["typedConfig"]
    fields = hcm["accessLog"][0]["typedConfig"]["logFormat"]["jsonFormat"]
    assert fields["upstream_host"] == "%UPSTREAM_HOST%" and fields["replica"] == "%RESP(X-KERNELGATE-REPLICA)%"
    assert "accessLog" not in json.dumps(render(EnvoyConfig(access_log_path="")))


def test_a_dns_name_makes_a_strict_dns_cluster() -> None:
    cfg = build(EnvoyConfig, {"upstream_addresses": ["kernelgate-inference:8000"]}, "envoy")
    assert clusters(render(cfg))["inference"]["type"] == "STRICT_DNS"


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    cfg = build(EnvoyConfig, {"upstream_addresses": ["127.0.0.1:8000", "localhost:8001"], "otlp_address": "x:4317",
                              "model_upstreams": {"tiny-gpt2": ["127.0.0.1:9000"]},
                              "access_log_path": str(tmp_path / "access.log")}, "envoy")
    out = envoy_validate(render(cfg), tmp_path / "envoy.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_sidecar_polls_the_replicas_envoy_routes_to_unless_told_otherwise(tmp_path: Path) -> None:
    envoy = {"upstream_addresses": ["127.0.0.1:8000", "127.0.0.1:8001"], "model_upstreams": {"tiny": ["h:9"]}}
    config = load(write(tmp_path, {"envoy": envoy}), environ={})
    assert config.authz.replicas.targets == ["127.0.0.1:8000", "127.0.0.1:8001", "h:9"]
    config = load(write(tmp_path, {"envoy": envoy, "authz": {"replicas": {"targets": []}}}), environ={})
    assert config.authz.replicas.targets == [], "an explicit empty list turns polling off"
    config = load(write(tmp_path, {}), environ={"KERNELGATE__ENVOY__UPSTREAM_ADDRESSES": '["127.0.0.1:7000"]'})
    assert config.envoy.replicas == config.authz.replicas.targets == ["127.0.0.1:7000"]


@pytest.mark.parametrize(("section", "message"), [
    ({"envoy": {"upstream": {"lb_policy": "random"}}}, "envoy.upstream.lb_policy"),
    ({"envoy": {"upstream": {"health_check_path": "readyz"}}}, "health_check_path"),
    ({"envoy": {"model_upstreams": {"tiny": []}}}, "model_upstreams.tiny"),
    ({"authz": {"replicas": {"targets": ["no-port"]}}}, "replicas.targets"),
    ({"authz": {"replicas": {"poll_s": 1}}}, "authz.replicas.poll_s"),
])
def test_bad_replica_settings_fail_at_load_naming_the_key(tmp_path: Path, section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load(write(tmp_path, section), environ={})


def test_up_gives_each_replica_its_port_id_and_gpu(tmp_path: Path) -> None:
    config = load(write(tmp_path, {"inference": {"listen": {"port": 8100}}}), environ={})
    envs = replica_envs(config, 3, gpus=["0", "1"])
    assert [e["KERNELGATE__INFERENCE__LISTEN__PORT"] for e in envs] == ["8100", "8101", "8102"]
    assert [e["KERNELGATE__INFERENCE__REPLICA_ID"] for e in envs] == ["replica-0", "replica-1", "replica-2"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in replica_envs(config, 2, gpus=["0"])), \
        "one GPU (or none): every replica uses the one device"
