"""Prometheus metrics of the sidecar, on a registry passed in (no global default registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.identity.status import ProviderStatus


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry):
        self._registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see count()
        self.checks = Counter("kernelgate_authz_checks_total", "Checks answered, by outcome and reason",
                              ["outcome", "reason"], registry=registry)
        self.opa_failures = Counter("kernelgate_authz_opa_failures_total",
                                    "Checks OPA could not decide, by the failure mode applied",
                                    ["mode"], registry=registry)
        self.cache = Counter("kernelgate_authz_decision_cache_total", "Decision cache lookups",
                             ["result"], registry=registry)
        self.ratelimit = Counter("kernelgate_authz_ratelimit_total", "Rate-limit outcomes",
                                 ["outcome", "backend"], registry=registry)
        self.tokens = Counter("kernelgate_authz_tokens_total",
                              "Token budget units by tenant: reserved at admission, charged when settled to the "
                              "reported usage or expired (at the reserved amount), refunded",
                              ["tenant", "kind"], registry=registry)
        self.settlements = Counter("kernelgate_authz_settlements_total",
                                   "Reservations closed: settled, expired unreported, or reports for unknown ids",
                                   ["outcome"], registry=registry)
        self.prompt_counts = Counter("kernelgate_authz_prompt_tokens_source_total",
                                     "Prompts priced by the server's count or by the estimate", ["source"],
                                     registry=registry)
        self.latency = Histogram("kernelgate_authz_check_seconds", "Time to answer a check",
                                 buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                                 registry=registry)
        self.replica_requests = Gauge("kernelgate_replica_requests",
                                      "Requests on an inference replica at its last load report, by state",
                                      ["replica", "model", "state"], registry=registry)
        self.replica_up = Gauge("kernelgate_replica_up",
                                "1 when the replica answered its last load poll and is ready",
                                ["replica", "model"], registry=registry)
        self.replica_saturated = Gauge("kernelgate_replica_saturated",
                                       "1 when the replica's batch and queue are full", ["replica", "model"],
                                       registry=registry)
        self.canary_rollbacks = Counter("kernelgate_authz_canary_rollbacks_total",
                                        "Canaries an inference server rolled back whose weight the sidecar set "
                                        "to 0 in the policy's data", ["model", "version"], registry=registry)
        self.model_versions = Counter("kernelgate_authz_model_version_total",
                                      "Allowed requests by the model version the policy picked (canary rollouts)",
                                      ["model", "version"], registry=registry)
        self.saturated_models = Gauge("kernelgate_model_saturated",
                                      "1 when no replica of the model has room (the policy may degrade)",
                                      ["model"], registry=registry)

    def count(self, counter: Counter, *labels: str, amount: float = 1) -> None:
        """``counter.labels(*labels).inc(amount)`` for the per-check counters, the labelled child found in
        a dict: prometheus_client validates the labels and takes a lock on every ``labels()`` call."""
        key = (id(counter), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc(amount)

    def watch_identity_providers(self, status: Callable[[], Iterable[ProviderStatus]]) -> None:
        """Export the identity providers' state, read from ``status`` at each scrape."""
        self._registry.register(IdentityProviderCollector(status))


class IdentityProviderCollector(Collector):
    """``kernelgate_authz_identity_provider_*``: one series per OIDC issuer or introspection endpoint."""

    def __init__(self, status: Callable[[], Iterable[ProviderStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        labels = ["provider", "method"]
        up = GaugeMetricFamily("kernelgate_authz_identity_provider_up",
                               "1: the provider's last fetch succeeded; 0: unreachable, cached keys or answers in use",
                               labels=labels)
        age = GaugeMetricFamily("kernelgate_authz_identity_provider_last_success_age_seconds",
                                "Seconds since the provider last answered (absent: never)", labels=labels)
        cached = GaugeMetricFamily("kernelgate_authz_identity_provider_cached",
                                   "Signing keys held (OIDC) or answers cached (introspection)", labels=labels)
        fetches = CounterMetricFamily("kernelgate_authz_identity_provider_fetches",
                                      "Calls to the provider (discovery+JWKS, or introspection), by outcome",
                                      labels=[*labels, "outcome"])
        limited = CounterMetricFamily("kernelgate_authz_identity_refresh_rate_limited",
                                      "Key refreshes for an unknown kid refused because one ran too recently",
                                      labels=labels)
        for s in self._status():
            values = [s.name, s.method]
            up.add_metric(values, 1.0 if s.up else 0.0)
            if s.last_success_age_s is not None:
                age.add_metric(values, s.last_success_age_s)
            cached.add_metric(values, s.keys)
            fetches.add_metric([*values, "ok"], s.fetches_ok)
            fetches.add_metric([*values, "error"], s.fetches_failed)
            limited.add_metric(values, s.refreshes_rate_limited)
        yield from (up, age, cached, fetches, limited)

    def describe(self) -> Iterator[Metric]:
        return iter(())
