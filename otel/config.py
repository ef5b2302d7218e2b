"""Typed configuration of tracing (the ``telemetry:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class KernelTraceConfig:
    """CUDA kernel capture: sampled, rate-limited, processed off the request path."""

    ratio: float = 0.0
    # Header that forces a kernel trace, honoured only when the policy allowed it for the tenant.
    force_header: str = "x-kernelgate-trace-kernels"
    max_spans_per_trace: int = 512
    max_captures_per_minute: int = 6
    # Kernels of one name beyond this count in one forward are folded into one span with a count.
    fold_after: int = 8


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = False
    # OTLP collector (Jaeger v2 takes OTLP directly): grpc -> host:port, http -> http://host:4318
    otlp_endpoint: str = "127.0.0.1:4317"
    protocol: Literal["grpc", "http"] = "grpc"
    # Head sampling (parent-based): share of new traces recorded.
    sampling_ratio: float = 1.0
    export_timeout_s: float = 5.0
    max_queue_size: int = 8192
    resource_attributes: dict[str, str] = field(default_factory=dict)
    kernels: KernelTraceConfig = field(default_factory=KernelTraceConfig)
