"""OpenTelemetry GenAI semantic-convention metrics of the inference server (through the OTel API only).

In: one call per generation response (from ``inference.openai.serving``, where a response
ends) and one per first token. Out: ``gen_ai.server.request.duration``,
``gen_ai.server.time_to_first_token``, ``gen_ai.server.time_per_output_token`` (seconds) and
``gen_ai.client.token.usage`` (``{token}``, ``gen_ai.token.type`` input/output) on the meter
``kernelgate.inference``. Whoever installs an SDK meter provider (``otel/setup.py``:
OTLP, the exporter traces use) gets them; without one they are no-ops. The Prometheus
metrics (``inference/metrics.py``) are unchanged beside them.

Attributes are bounded: the model is one the server serves (checked before anything is
recorded), the operation one of two, and tenants beyond ``max_tenants`` distinct values
are recorded as ``other`` (a tenant is an attribute of every series, so an unbounded set
would grow the exporter's memory and the backend's series without limit).
"""

from __future__ import annotations

import threading

from opentelemetry import metrics

from otel import names

METER_NAME = names.INFERENCE_TRACER  # the instrumentation scope of the server's spans and metrics
PROVIDER = "kernelgate"
OTHER_TENANT = "other"
DEFAULT_MAX_TENANTS = 64

# Bucket boundaries the GenAI semantic conventions advise for each instrument.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


class TenantBound:
    """Tenant attribute values, at most ``limit`` distinct ones; later ones read ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        if tenant in self._seen:
            return tenant
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANT


class GenAIMetrics:
    """The four GenAI instruments; one per server."""

    def __init__(self, meter: metrics.Meter | None = None, max_tenants: int = DEFAULT_MAX_TENANTS) -> None:
        meter = meter or metrics.get_meter(METER_NAME)
        self._tenant = TenantBound(max_tenants)
        self._duration = meter.create_histogram(
            names.METRIC_SERVER_REQUEST_DURATION, unit="s", description="Generative AI server request duration",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self._ttft = meter.create_histogram(
            names.METRIC_SERVER_TIME_TO_FIRST_TOKEN, unit="s", description="Time to generate first token",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS)
        self._tpot = meter.create_histogram(
            names.METRIC_SERVER_TIME_PER_OUTPUT_TOKEN, unit="s",
            description="Time per output token generated after the first token",
            explicit_bucket_boundaries_advisory=_TPOT_BUCKETS)
        self._tokens = meter.create_histogram(
            names.METRIC_CLIENT_TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)

    def attributes(self, operation: str, request_model: str, response_model: str, tenant: str) -> dict[str, str]:
        return {names.GEN_AI_OPERATION_NAME: operation, names.GEN_AI_PROVIDER_NAME: PROVIDER,
                names.GEN_AI_REQUEST_MODEL: request_model, names.GEN_AI_RESPONSE_MODEL: response_model,
                names.TENANT: self._tenant(tenant)}

    def first_token(self, attributes: dict[str, str], seconds: float) -> None:
        self._ttft.record(seconds, attributes)

    def response(self, attributes: dict[str, str], seconds: float, input_tokens: int, output_tokens: int,
                 decode_seconds: float | None, longest: int, error: str | None) -> None:
        """A response ended: its duration, its tokens, and (when a choice made several) the time per
        output token after the first (``decode_seconds`` over the longest choice's ``longest`` tokens)."""
        if error is not None:
            self._duration.record(seconds, {**attributes, names.ERROR_TYPE: error})
            return
        self._duration.record(seconds, attributes)
        self._tokens.record(input_tokens, {**attributes, names.GEN_AI_TOKEN_TYPE: "input"})
        self._tokens.record(output_tokens, {**attributes, names.GEN_AI_TOKEN_TYPE: "output"})
        if decode_seconds is not None and longest > 1:
            self._tpot.record(decode_seconds / (longest - 1), attributes)
