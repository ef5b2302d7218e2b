"""Default ports and addresses of the pod's processes: their one home.

The config dataclasses (``sidecar.config``, ``inference.config``, ``otel.config``,
``kernelgate.envoy_config``, ``kernelgate.config``) take their defaults from here, and
``kernelgate inject`` binds the same ports; ``config/kernelgate.yaml`` and ``k8s/base`` spell
them out for readers and ``tests/common/test_ports.py`` checks they agree with this module.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"

ENVOY_PORT = 8080              # the pod's only port reachable from other pods
ENVOY_ADMIN_PORT = 9901
AUTHZ_PORT = 9191              # the ext_authz sidecar (gRPC)
AUTHZ_METRICS_PORT = 9192      # its Prometheus /metrics
OPA_PORT = 8181                # OPA's REST API (loopback only)
OPA_DIAGNOSTIC_PORT = 8282     # OPA's /health for the kubelet
INFERENCE_PORT = 8000          # the inference server (HTTP, OpenAI-style)
INFERENCE_ADMIN_PORT = 8001    # its model-lifecycle admin API (loopback only, never routed by Envoy)
OTLP_GRPC_PORT = 4317          # an OTLP collector (Jaeger v2)
OTLP_HTTP_PORT = 4318
JAEGER_UI_PORT = 16686
REDIS_PORT = 6379


def loopback(port: int) -> str:
    """``127.0.0.1:port``."""
    return f"{LOOPBACK}:{port}"


AUTHZ_ADDRESS = loopback(AUTHZ_PORT)
AUTHZ_METRICS_ADDRESS = loopback(AUTHZ_METRICS_PORT)
INFERENCE_ADDRESS = loopback(INFERENCE_PORT)
OTLP_GRPC_ADDRESS = loopback(OTLP_GRPC_PORT)
OPA_URL = f"http://{loopback(OPA_PORT)}"
REDIS_URL = f"redis://{loopback(REDIS_PORT)}/0"
