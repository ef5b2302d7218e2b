"""Prometheus metrics of the sidecar, on a registry passed in (no global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.checks = Counter("kernelgate_authz_checks_total", "Checks answered, by outcome and reason",
                              ["outcome", "reason"], registry=registry)
        self.opa_failures = Counter("kernelgate_authz_opa_failures_total",
                                    "Checks OPA could not decide, by the failure mode applied",
                                    ["mode"], registry=registry)
        self.cache = Counter("kernelgate_authz_decision_cache_total", "Decision cache lookups",
                             ["result"], registry=registry)
        self.ratelimit = Counter("kernelgate_authz_ratelimit_total", "Rate-limit outcomes",
                                 ["outcome", "backend"], registry=registry)
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
        self.saturated_models = Gauge("kernelgate_model_saturated",
                                      "1 when no replica of the model has room (the policy may degrade)",
                                      ["model"], registry=registry)
