"""Typed configuration of the ext_authz sidecar (the ``authz:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.ports import AUTHZ_ADDRESS, AUTHZ_METRICS_ADDRESS, OPA_URL, REDIS_URL

Unit = Literal["second", "minute", "hour", "day"]

UNIT_SECONDS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True)
class OpaConfig:
    """Where the policy is evaluated and how its answers are used."""

    # "server": ask the OPA server at ``url`` (opa-python-client). "wasm": evaluate in process
    # the same policy compiled by OPA (``kernelgate build-policy`` / ``opa build -t wasm``)
    # from ``wasm_bundle_file``, reloaded when the file changes.
    mode: Literal["server", "wasm"] = "server"
    url: str = OPA_URL
    wasm_bundle_file: str | None = None
    # Data path of the decision: package envoy.authz, rule ``result`` (OPA-Envoy's convention).
    policy_path: str = "envoy/authz/result"
    timeout_s: float = 0.5
    # "deny": OPA unreachable or slow -> 503 (fail closed). "allow": let the request through.
    failure_mode: Literal["deny", "allow"] = "deny"
    cache_size: int = 10_000
    cache_ttl_s: float = 5.0
    # Data documents whose content is the policy's data revision (hashed with /v1/policies).
    revision_paths: list[str] = field(default_factory=lambda: ["kernelgate"])
    revision_poll_s: float = 1.0
    # Headers that differ per request and that policies must not read; left out of the cache key.
    cache_ignore_headers: list[str] = field(
        default_factory=lambda: [
            "x-request-id", "traceparent", "tracestate", "baggage", "x-b3-traceid",
            "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-envoy-expected-rq-timeout-ms",
            "content-length",
        ]
    )

    def __post_init__(self) -> None:
        if self.mode == "wasm" and not self.wasm_bundle_file:
            raise ValueError("opa.mode 'wasm' needs opa.wasm_bundle_file")


@dataclass(frozen=True)
class JwtConfig:
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256", "HS256"])
    leeway_s: float = 0.0
    max_token_bytes: int = 8192
    # Claims that carry the tenant, tier and scopes.
    tenant_claim: str = "tenant"
    tier_claim: str = "tier"
    scopes_claim: str = "scope"


@dataclass(frozen=True)
class IdentityConfig:
    # False: kernelgate authenticates nobody; every caller is anonymous to it and the policy reads
    # the raw headers, as OPA-Envoy policies that verify JWTs themselves (io.jwt.decode_verify) do.
    enabled: bool = True
    # YAML/JSON file of {sha256 hex of key: {tenant, tier, scopes, name}}; reloaded on change.
    api_keys_file: str | None = None
    api_key_header: str = "x-api-key"
    jwt: JwtConfig = field(default_factory=JwtConfig)
    reload_interval_s: float = 1.0


@dataclass(frozen=True)
class LimitRule:
    """Budgets for requests matching (tenant, model, route); "*" matches anything."""

    tenant: str = "*"
    model: str = "*"
    route: str = "*"
    requests: int | None = None
    tokens: int | None = None
    unit: Unit = "minute"


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = REDIS_URL
    redis_timeout_s: float = 0.05
    redis_key_prefix: str = "kernelgate:rl:"
    # Redis unreachable: "local" falls back to in-memory budgets, "deny" answers 503, "allow" skips limits.
    redis_failure_mode: Literal["local", "deny", "allow"] = "local"
    # Count and log, never deny.
    shadow: bool = False
    # Used when the policy's decision carries no ``rate_limit`` object.
    rules: list[LimitRule] = field(default_factory=list)
    # Token estimate when the body gives no max_tokens (OpenAI's default for completions).
    default_max_tokens: int = 16
    chars_per_token: float = 4.0


@dataclass(frozen=True)
class DecisionLogConfig:
    enabled: bool = True
    # "-" is standard output; else a file path (appended).
    output_file: str = "-"


@dataclass(frozen=True)
class ReplicasConfig:
    """The inference replicas whose load the sidecar polls (``GET /load``) to learn saturation.

    ``targets``: host:port of each replica; a name resolves to every address it has (a
    Kubernetes headless Service). None: the replicas Envoy routes to (``envoy.upstream_addresses``
    and ``envoy.model_upstreams``), filled in by the config loader; [] turns polling off.
    """

    targets: list[str] | None = None
    poll_interval_s: float = 0.25
    timeout_s: float = 0.5
    resolve_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.timeout_s <= 0 or self.resolve_interval_s <= 0:
            raise ValueError("replicas.poll_interval_s, timeout_s and resolve_interval_s must be > 0")
        for target in self.targets or []:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"replicas.targets: {target!r} is not host:port")


@dataclass(frozen=True)
class SidecarConfig:
    # host:port, or unix:/path/to.sock
    listen: str = AUTHZ_ADDRESS
    # host:port for Envoy's HTTP ext_authz (http_service): the lean data path (sidecar/http_transport.py),
    # same decisions as gRPC Check, which stays on ``listen``. "" = gRPC only.
    http_listen: str = ""
    # Seconds SIGTERM waits for in-flight checks before exit.
    drain_s: float = 10.0
    # Worker processes sharing the port (SO_REUSEPORT); 1 = this process only. More than one
    # needs budgets every worker shares: ratelimit.backend "redis" (or rate limits off).
    workers: int = 1
    # Prefix of headers the sidecar adds for the upstream; clients' own copies are removed.
    header_prefix: str = "x-kernelgate-"
    # Remove the caller's credentials (Authorization, API key header) before the upstream sees them.
    strip_credentials: bool = True
    # Bodies larger than this are not parsed (the policy sees body_error "too_large").
    max_body_bytes: int = 1 << 20
    # Prometheus /metrics of the sidecar ("" disables).
    metrics_listen: str = AUTHZ_METRICS_ADDRESS
    opa: OpaConfig = field(default_factory=OpaConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    decision_log: DecisionLogConfig = field(default_factory=DecisionLogConfig)
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.workers > 1 and self.listen.startswith("unix:"):
            raise ValueError("workers > 1 needs a TCP listen address (SO_REUSEPORT)")
        if self.workers > 1 and self.ratelimit.enabled and self.ratelimit.backend == "memory":
            raise ValueError("workers > 1 with in-memory rate limits would give each worker its own budget; "
                             "use ratelimit.backend: redis")
