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


# A claim is named by a string (a top-level claim, taken whole: "https://example.com/tenant" and
# "kubernetes.io" are single claims) or by a list of names, a path into nested objects
# (["kubernetes.io", "namespace"]).
ClaimPath = str | list[str]

# Signature algorithms an identity provider may use; HMAC is never accepted from a remote JWKS.
REMOTE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


@dataclass(frozen=True)
class ClaimMapping:
    """Which claims of a token (or introspection answer) fill the Identity."""

    tenant: ClaimPath = "tenant"
    tier: ClaimPath | None = "tier"
    scopes: ClaimPath | None = "scope"  # a space-separated string or a list of strings
    subject: ClaimPath | None = "sub"


# What a Kubernetes service-account token carries: the namespace is the tenant.
KUBERNETES_CLAIMS = ClaimMapping(tenant=["kubernetes.io", "namespace"], tier=None, scopes=None, subject="sub")


@dataclass(frozen=True)
class OidcIssuerConfig:
    """One identity provider whose signed JWTs are accepted, its keys fetched from its JWKS URL.

    ``kind: kubernetes`` is the cluster's service-account issuer (``/openid/v1/jwks``): its
    claims default to KUBERNETES_CLAIMS and the identity's method is ``service_account``.
    """

    issuer: str = ""  # must equal the token's ``iss`` and the discovery document's ``issuer``
    audiences: list[str] = field(default_factory=list)  # the token's ``aud`` must name one
    kind: Literal["oidc", "kubernetes"] = "oidc"
    # Default: ``{issuer}/.well-known/openid-configuration``. ``jwks_uri`` set skips discovery.
    discovery_url: str | None = None
    jwks_uri: str | None = None
    algorithms: list[str] = field(default_factory=lambda: list(REMOTE_ALGORITHMS))
    claims: ClaimMapping | None = None  # None: ClaimMapping() (oidc) or KUBERNETES_CLAIMS
    leeway_s: float = 5.0
    # Scheduled refresh of the keys; an unknown ``kid`` refreshes sooner, at most once per
    # ``min_refresh_interval_s`` (a flood of forged kids cannot hammer the provider).
    refresh_interval_s: float = 300.0
    min_refresh_interval_s: float = 10.0
    # After a failed fetch, retry after this (doubling up to refresh_interval_s).
    retry_interval_s: float = 2.0
    fetch_timeout_s: float = 2.0
    # The longest a check waits for a fetch it needs (no keys yet, or an unknown kid); the
    # fetch goes on in the background. Keep it under Envoy's ext_authz timeout.
    check_wait_s: float = 0.5
    # TLS trust for the provider (the cluster CA for kind kubernetes); None: the system's.
    ca_file: str | None = None
    # Sent as ``Authorization: Bearer`` to discovery and JWKS (the API server may require it);
    # read at every fetch, as projected tokens rotate.
    bearer_token_file: str | None = None

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("issuer: must be set (the exact iss of the tokens)")
        if not self.audiences:
            raise ValueError(f"audiences: issuer {self.issuer} needs at least one accepted audience")
        bad = [a for a in self.algorithms if a not in REMOTE_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"algorithms: {bad[0] if bad else '[]'!s} is not one of {', '.join(REMOTE_ALGORITHMS)}")
        for name in ("refresh_interval_s", "min_refresh_interval_s", "retry_interval_s", "fetch_timeout_s",
                     "check_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")

    @property
    def method(self) -> str:
        return "service_account" if self.kind == "kubernetes" else "oidc"

    @property
    def claim_mapping(self) -> ClaimMapping:
        if self.claims is not None:
            return self.claims
        return KUBERNETES_CLAIMS if self.kind == "kubernetes" else ClaimMapping()

    @property
    def discovery(self) -> str:
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True)
class IntrospectionConfig:
    """OAuth2 token introspection (RFC 7662) for opaque bearer tokens."""

    url: str | None = None  # the introspection endpoint; None: opaque tokens are not introspected
    # Name in the decision log and metrics; default: the URL.
    name: str | None = None
    # Client authentication (HTTP Basic); the secret is read from a file, never from the config.
    client_id: str | None = None
    client_secret_file: str | None = None
    audiences: list[str] = field(default_factory=list)  # if set, the answer's aud must name one
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    # Answers are cached by sha256 of the token: active ones until min(exp, cache_ttl_s),
    # inactive ones for negative_cache_ttl_s. A revoked token is refused within cache_ttl_s.
    cache_size: int = 10_000
    cache_ttl_s: float = 30.0
    negative_cache_ttl_s: float = 5.0
    timeout_s: float = 2.0
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url: must be an http(s) URL")
        if (self.client_id is None) != (self.client_secret_file is None):
            raise ValueError("client_id and client_secret_file: set both or neither")
        if self.cache_size < 0 or self.cache_ttl_s < 0 or self.negative_cache_ttl_s < 0 or self.timeout_s <= 0:
            raise ValueError("cache_size, cache_ttl_s, negative_cache_ttl_s must be >= 0 and timeout_s > 0")

    @property
    def display_name(self) -> str:
        return self.name or (self.url or "")


@dataclass(frozen=True)
class PeerIdentity:
    tenant: str = ""
    tier: str | None = None
    scopes: list[str] = field(default_factory=list)
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("tenant: must be a non-empty string")


@dataclass(frozen=True)
class MtlsConfig:
    """Identity from the client certificate Envoy verified (mutual TLS on its listener)."""

    enabled: bool = False
    # URI SAN (a SPIFFE ID such as spiffe://cluster.local/ns/acme/sa/client) -> who that is.
    identities: dict[str, PeerIdentity] = field(default_factory=dict)


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
    # Identity providers whose JWTs are accepted (chosen by the token's ``iss``).
    issuers: list[OidcIssuerConfig] = field(default_factory=list)
    introspection: IntrospectionConfig = field(default_factory=IntrospectionConfig)
    mtls: MtlsConfig = field(default_factory=MtlsConfig)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for index, issuer in enumerate(self.issuers):
            if issuer.issuer in seen:
                raise ValueError(f"issuers[{index}].issuer: {issuer.issuer} is configured twice")
            seen.add(issuer.issuer)
        if self.jwt.jwks_file and self.jwt.issuer in seen:
            raise ValueError(f"jwt.issuer: {self.jwt.issuer} is also one of issuers[]")


@dataclass(frozen=True)
class LimitRule:
    """Budgets for requests matching (tenant, model, route); "*" matches anything."""

    tenant: str = "*"
    model: str = "*"
    route: str = "*"
    requests: int | None = None
    tokens: int | None = None
    unit: Unit = "minute"
    # Requests in flight at once for this (tenant, model, route); released when the response ends.
    concurrency: int | None = None
    # A token costs this much of the ``tokens`` budget: prompt (prefilled) and completion (generated)
    # tokens apart, since generated tokens cost more GPU time.
    input_weight: float = 1.0
    output_weight: float = 1.0
    # Completion tokens to reserve when the client sends no max_tokens (None: ratelimit.default_max_tokens).
    default_max_tokens: int | None = None
    # Admit with what is left of the budget and end the stream there ("length") rather than 429.
    enforce_midstream: bool = False

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.input_weight < 0 or self.output_weight <= 0:
            raise ValueError("input_weight must be >= 0 and output_weight > 0")


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
    # Reserve at admission and settle to the usage the inference server reports (gRPC
    # kernelgate.settlement.v1.Settlement on ``listen``) when a response ends; false: charge the
    # estimate at admission and never settle.
    settle: bool = True
    # An unsettled reservation (report lost, server killed) expires after this long and stays
    # charged at its reserved amount; longer than the inference server's request timeout.
    reservation_ttl_s: float = 330.0
    # The inference server's /tokenize, which counts a prompt with the served model's tokenizer and
    # chat template ("" = estimate at chars_per_token); on failure the estimate is used.
    count_url: str = ""
    count_timeout_s: float = 0.25

    def __post_init__(self) -> None:
        if self.reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be positive")


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
