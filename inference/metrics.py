"""Prometheus metrics of the inference server, registered on a registry passed in.

No default global registry: two servers in one process (tests) keep separate counts.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class InferenceMetrics:
    """Every metric the server exports; the HTTP layer and the engine each update theirs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("kernelgate_inference_requests", "HTTP requests by route, status and tenant",
                                ["route", "status", "tenant"], registry=registry)
        self.request_seconds = Histogram("kernelgate_inference_request_duration_seconds",
                                         "HTTP request duration by route", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("kernelgate_inference_queue_depth",
                                 "Requests waiting for a batch slot", registry=registry)
        self.running = Gauge("kernelgate_inference_running_requests",
                             "Requests holding a batch slot", registry=registry)
        self.batch_size = Histogram("kernelgate_inference_batch_size", "Sequences per engine step",
                                    ["phase"], buckets=_BATCH_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram("kernelgate_inference_time_to_first_token_seconds",
                                             "Submission to first generated token", buckets=_LATENCY_BUCKETS,
                                             registry=registry)
        self.time_per_output_token = Histogram("kernelgate_inference_time_per_output_token_seconds",
                                               "Mean gap between generated tokens of a request",
                                               buckets=_TOKEN_BUCKETS, registry=registry)
        self.generated_tokens = Counter("kernelgate_inference_generated_tokens",
                                        "Completion tokens generated", registry=registry)
        self.prompt_tokens = Counter("kernelgate_inference_prompt_tokens", "Prompt tokens prefilled",
                                     registry=registry)
        self.pipelined_steps = Counter("kernelgate_inference_pipelined_decode_steps",
                                       "Decode steps launched before the previous step's tokens were read "
                                       "(batching.pipeline_decode)", registry=registry)
        self.finished = Counter("kernelgate_inference_finished_requests",
                                "Generation requests by finish reason", ["reason"], registry=registry)
        self.gpu_memory = Gauge("kernelgate_inference_gpu_memory_bytes",
                                "GPU memory allocated by the model server (0 on CPU)", registry=registry)
        self.ready = Gauge("kernelgate_inference_ready", "1 once the model is loaded and warmed up",
                           registry=registry)

    def watch_models(self, read_status: Callable[[], dict[str, Any]]) -> None:
        """Report every model version's state and requests from ``read_status`` (the registry's) at each scrape."""
        self.registry.register(_ModelVersions(read_status))

    def watch_gpu_memory(self, read_bytes: Callable[[], float]) -> None:
        """Report GPU memory from ``read_bytes`` at each scrape."""
        self.gpu_memory.set_function(read_bytes)


class _ModelVersions:
    """Collector: ``kernelgate_inference_model_version_state{model,version,state}`` (1 per version),
    ``kernelgate_inference_model_version_requests_total``, ``..._rollbacks_total``, and the
    rollback window's ``..._error_rate`` and ``..._ttft_p50_seconds`` (all ``{model,version}``)."""

    def __init__(self, read_status: Callable[[], dict[str, Any]]) -> None:
        self._read = read_status

    def collect(self) -> Any:
        state = GaugeMetricFamily("kernelgate_inference_model_version_state",
                                  "Model versions by state (1 for the version's current state)",
                                  labels=["model", "version", "state"])
        served = CounterMetricFamily("kernelgate_inference_model_version_requests",
                                     "Generation requests served by each model version", labels=["model", "version"])
        rollbacks = CounterMetricFamily("kernelgate_inference_model_version_rollbacks",
                                        "Automatic rollbacks of a canary version", labels=["model", "version"])
        errors = GaugeMetricFamily("kernelgate_inference_model_version_error_rate",
                                   "Share of a version's responses that failed (rollback window)",
                                   labels=["model", "version"])
        ttft = GaugeMetricFamily("kernelgate_inference_model_version_ttft_p50_seconds",
                                 "A version's median time to first token (rollback window)", labels=["model", "version"])
        for model in self._read()["models"]:
            for version in model["versions"]:
                labels = [model["name"], version["version"]]
                state.add_metric([*labels, version["state"]], 1)
                served.add_metric(labels, version["served"])
                rollbacks.add_metric(labels, version.get("rollbacks", 0))
                health = version.get("health")
                if health and health["requests"]:
                    errors.add_metric(labels, health["error_rate"])
                    if health["ttft_p50_ms"] is not None:
                        ttft.add_metric(labels, health["ttft_p50_ms"] / 1e3)
        yield state
        yield served
        yield rollbacks
        yield errors
        yield ttft
