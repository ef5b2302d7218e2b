"""``common/ports.py`` is the one home of the default ports: the config files and k8s/base agree with it."""

from __future__ import annotations

import pytest
import yaml

from common import ports
from kernelgate.config import KernelgateConfig, load
from kernelgate.inject import RESERVED_PORTS
from tests.procs import ROOT


def _port(address: str) -> int:
    return int(address.rpartition(":")[2].split("/")[0])


def port_map(config: KernelgateConfig) -> dict[str, int]:
    """Every port a config names, by what it is."""
    return {
        "authz": _port(config.authz.listen),
        "authz metrics": _port(config.authz.metrics_listen),
        "opa": _port(config.authz.opa.url),
        "redis": _port(config.authz.ratelimit.redis_url),
        "envoy": config.envoy.listen_port,
        "envoy admin": config.envoy.admin_port,
        "envoy -> authz": _port(config.envoy.authz_address),
        "envoy -> inference": _port(config.envoy.upstream_address),
        "inference": config.inference.listen.port,
        "otlp": _port(config.telemetry.otlp_endpoint),
    }


EXPECTED = {
    "authz": ports.AUTHZ_PORT, "authz metrics": ports.AUTHZ_METRICS_PORT, "opa": ports.OPA_PORT,
    "redis": ports.REDIS_PORT, "envoy": ports.ENVOY_PORT, "envoy admin": ports.ENVOY_ADMIN_PORT,
    "envoy -> authz": ports.AUTHZ_PORT, "envoy -> inference": ports.INFERENCE_PORT,
    "inference": ports.INFERENCE_PORT, "otlp": ports.OTLP_GRPC_PORT,
}


def test_the_defaults_are_common_ports():
    assert port_map(KernelgateConfig()) == EXPECTED


@pytest.mark.parametrize("path", ["config/kernelgate.yaml", "k8s/base/kernelgate.yaml"])
def test_the_config_files_use_the_default_ports(path):
    assert port_map(load(ROOT / path, environ={})) == EXPECTED


def test_the_pod_and_inject_bind_the_default_ports():
    docs = list(yaml.safe_load_all((ROOT / "k8s/base/deployment.yaml").read_text()))
    pod = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]
    declared = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert declared == {ports.INFERENCE_PORT, ports.AUTHZ_PORT, ports.AUTHZ_METRICS_PORT, ports.ENVOY_PORT,
                        ports.ENVOY_ADMIN_PORT, ports.OPA_DIAGNOSTIC_PORT}
    assert set(RESERVED_PORTS) == {ports.ENVOY_PORT, ports.ENVOY_ADMIN_PORT, ports.AUTHZ_PORT,
                                   ports.AUTHZ_METRICS_PORT, ports.OPA_PORT, ports.OPA_DIAGNOSTIC_PORT}
