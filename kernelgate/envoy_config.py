"""The Envoy bootstrap, built from envoy-data-plane's typed messages.

One function makes it for the local stack, the tests and the Kubernetes ConfigMap,
so all three run exactly the same Envoy configuration.

Inference upstreams: the served model's replicas (``upstream_addresses``, or the one
``upstream_address``) form the ``inference`` cluster; each model of ``model_upstreams``
(a fallback model, say) gets its own cluster, chosen by the ``x-kernelgate-model`` header
the policy sets (ext_authz clears the route cache so its headers pick the route). Every
inference cluster balances by least requests, health-checks each replica's readiness
endpoint, ejects failing replicas (outlier detection), caps connections and requests
(circuit breakers) and retries only what never started: connect failures, streams refused
or reset before the request was sent, and answers carrying the server's not-started header.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog, AccessLogFilter, AndFilter, ComparisonFilter, ComparisonFilterOp, ResponseFlagFilter, StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers, CircuitBreakersThresholds, CircuitBreakersThresholdsRetryBudget, Cluster, ClusterDiscoveryType,
    ClusterLbPolicy, OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address, DataSource, GrpcService, GrpcServiceEnvoyGrpc, HeaderValue, HealthCheck, HealthCheckHttpHealthCheck,
    Http1ProtocolOptions, Http2ProtocolOptions, HttpUri, Pipe, RuntimeUInt32, SocketAddress, SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher, RetryPolicy, RetryPolicyRetryBackOff, RetryPolicyRetryHostPredicate, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig
from envoy_data_plane.envoy.config.trace.v3 import TracingHttp as TracingProvider
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest, AuthorizationResponse, BufferSettings, ExtAuthz, HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager, HttpConnectionManagerCodecType, HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpConnectionManagerTracing, HttpFilter, LocalReplyConfig, ResponseMapper,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, TlsCertificate,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions, HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from common.models import ROUTED_MODEL_HEADER
from common.ports import AUTHZ_ADDRESS, ENVOY_ADMIN_PORT, ENVOY_PORT, INFERENCE_ADDRESS, LOOPBACK
from common.replicas import NOT_STARTED_HEADER
from sidecar import http_contract

AUTHZ_CLUSTER = "kernelgate_authz"
UPSTREAM_CLUSTER = "inference"
OTLP_CLUSTER = "otel_collector"
# The header the policy sets to the model that serves the request (a fallback when degraded).
MODEL_HEADER = ROUTED_MODEL_HEADER
# Retry only what never reached a model: see the module docstring.
RETRY_ON = "connect-failure,refused-stream,reset-before-request,retriable-headers"
# One JSON line per request; upstream_host is the replica that served it.
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ)%",
    "status": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "replica": "%RESP(X-KERNELGATE-REPLICA)%",
    "model": "%REQ(X-KERNELGATE-MODEL)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "decision_id": "%REQ(X-KERNELGATE-DECISION-ID)%",
    "trace_id": "%TRACE_ID%",
}


@dataclass(frozen=True)
class UpstreamPolicy:
    """How Envoy spreads requests over inference replicas and routes around a failing one (``envoy.upstream``)."""

    # least_request: of two random replicas, the one with fewer active requests (a long
    # generation keeps its replica busy; round robin would pile more work on it).
    lb_policy: Literal["least_request", "round_robin"] = "least_request"
    # Active health check: GET this path on every replica; 200 is healthy (/readyz: loaded, not draining).
    health_check_path: str = "/readyz"
    health_check_interval_s: float = 1.0
    health_check_timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    # Outlier detection: this many 5xx or connect failures in a row eject a replica for
    # base_ejection_s (longer each time); a passing health check brings it back sooner.
    outlier_consecutive_5xx: int = 3
    outlier_interval_s: float = 1.0
    outlier_base_ejection_s: float = 10.0
    outlier_max_ejection_percent: int = 50
    # Circuit breakers of each inference cluster.
    max_connections: int = 4096
    max_pending_requests: int = 1024
    max_requests: int = 4096
    # Retries of requests that never started (see RETRY_ON), each on another replica; the budget
    # caps concurrent retries at this share of active requests (never below min_retry_concurrency).
    retries: int = 2
    retry_budget_percent: float = 25.0
    min_retry_concurrency: int = 32

    def __post_init__(self) -> None:
        if not self.health_check_path.startswith("/"):
            raise ValueError(f"upstream.health_check_path must start with '/', got {self.health_check_path!r}")
        for name in ("health_check_interval_s", "health_check_timeout_s", "outlier_interval_s",
                     "outlier_base_ejection_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"upstream.{name} must be > 0")
        if not 0 <= self.outlier_max_ejection_percent <= 100:
            raise ValueError("upstream.outlier_max_ejection_percent must be 0..100")
        if self.retries < 0 or min(self.unhealthy_threshold, self.healthy_threshold, self.outlier_consecutive_5xx) < 1:
            raise ValueError("upstream.retries must be >= 0 and the thresholds >= 1")


@dataclass(frozen=True)
class EnvoyConfig:
    listen_host: str = LOOPBACK
    listen_port: int = ENVOY_PORT
    admin_host: str = LOOPBACK
    admin_port: int = ENVOY_ADMIN_PORT
    # host:port or unix:/path of the kernelgate authz sidecar.
    authz_address: str = AUTHZ_ADDRESS
    # False leaves ext_authz out (bench/ measures Envoy alone with it).
    authz_enabled: bool = True
    authz_timeout_s: float = 1.0
    # "grpc": ext_authz grpc_service (Check); "http": http_service, the sidecar's http_listen
    # (faster; see sidecar/http_transport.py for what it cannot carry).
    authz_transport: Literal["grpc", "http"] = "grpc"
    # Envoy's answer when the sidecar itself cannot be reached: no request passes without an allow.
    failure_mode_allow: bool = False
    status_on_error: int = 503
    upstream_address: str = INFERENCE_ADDRESS
    # The served model's replicas (host:port each; a name resolving to several addresses, e.g. a
    # headless Service, counts every address). Empty: the one upstream_address.
    upstream_addresses: list[str] = field(default_factory=list)
    # Other models by name (e.g. the fallback a degraded request goes to): their replicas.
    model_upstreams: dict[str, list[str]] = field(default_factory=dict)
    upstream: UpstreamPolicy = field(default_factory=UpstreamPolicy)
    # One JSON line per request ("" disables); /dev/stdout is the container log.
    access_log_path: str = "/dev/stdout"
    # Completions can stream for minutes; 0 disables the route timeout.
    upstream_timeout_s: float = 600.0
    # Bytes of the body sent to ext_authz; larger bodies arrive cut (x-envoy-auth-partial-body).
    max_request_bytes: int = 1 << 20
    # host:port of an OTLP/gRPC collector (Jaeger); "" disables tracing.
    otlp_address: str = ""
    service_name: str = "kernelgate-envoy"
    trace_sampling_percent: float = 100.0
    # TLS on the listener: PEM files of its certificate and key ("" = plain HTTP). With
    # tls_client_ca_file, clients must present a certificate signed by that CA (mutual TLS),
    # and ext_authz receives it (include_peer_certificate) for identity.mtls.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file: needs tls_cert_file and tls_key_file (mutual TLS is TLS)")
        for name, targets in self.model_upstreams.items():
            if not targets:
                raise ValueError(f"model_upstreams.{name}: list at least one host:port")

    @property
    def replicas(self) -> list[str]:
        """The served model's replica addresses."""
        return list(self.upstream_addresses) or [self.upstream_address]

    def all_replicas(self) -> list[str]:
        """Every inference address Envoy routes to (the served model's, then the other models')."""
        return self.replicas + [t for targets in self.model_upstreams.values() for t in targets]


def _address(target: str) -> Address:
    if target.startswith("unix:"):
        return Address(pipe=Pipe(path=target[len("unix:"):]))
    host, _, port = target.rpartition(":")
    return Address(socket_address=SocketAddress(address=host.strip("[]"), port_value=int(port)))


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _is_ip(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]")
    return target.startswith("unix:") or host.replace(".", "").isdigit() or ":" in host


def _cluster(name: str, targets: list[str], http2: bool, timeout_s: float = 1.0) -> Cluster:
    protocol = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()) if http2 else HttpProtocolOptionsExplicitHttpConfig(
        http_protocol_options=Http1ProtocolOptions()))
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if all(map(_is_ip, targets)) else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_seconds(timeout_s),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(protocol)},
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(t))) for t in targets])]),
    )


def _prefixes(prefixes: tuple[str, ...]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(prefix=p) for p in prefixes])


def _http_service(cfg: EnvoyConfig) -> HttpService:
    """Envoy's HTTP ext_authz client, configured for sidecar/http_transport.py."""
    return HttpService(
        server_uri=HttpUri(uri=f"http://{AUTHZ_CLUSTER}", cluster=AUTHZ_CLUSTER, timeout=_seconds(cfg.authz_timeout_s)),
        path_prefix=http_contract.PATH_PREFIX,
        authorization_request=AuthorizationRequest(
            headers_to_add=[HeaderValue(key=k, value=v) for k, v in http_contract.carried_headers(
                tls=bool(cfg.tls_cert_file), peer_certificate=bool(cfg.tls_client_ca_file)).items()]),
        authorization_response=AuthorizationResponse(
            allowed_upstream_headers=_prefixes(http_contract.UPSTREAM_HEADER_PREFIXES),
            allowed_client_headers_on_success=_prefixes(http_contract.CLIENT_HEADER_PREFIXES)),
    )


def _status_stand_ins() -> LocalReplyConfig:
    """ext_authz replies with a stand-in status (http_contract.STATUS_STAND_INS) -> the real 5xx."""
    return LocalReplyConfig(mappers=[ResponseMapper(
        filter=AccessLogFilter(and_filter=AndFilter(filters=[
            AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(
                op=ComparisonFilterOp.EQ,
                value=RuntimeUInt32(default_value=stand_in, runtime_key=f"kernelgate.authz_status_{stand_in}")))),
            AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["UAEX"]))])),
        status_code=status) for status, stand_in in http_contract.STATUS_STAND_INS.items()])


def _downstream_tls(cfg: EnvoyConfig) -> TransportSocket | None:
    if not cfg.tls_cert_file:
        return None
    common = CommonTlsContext(tls_certificates=[TlsCertificate(
        certificate_chain=DataSource(filename=cfg.tls_cert_file), private_key=DataSource(filename=cfg.tls_key_file))])
    if cfg.tls_client_ca_file:
        common.validation_context = CertificateValidationContext(
            trusted_ca=DataSource(filename=cfg.tls_client_ca_file))
    context = DownstreamTlsContext(common_tls_context=common, require_client_certificate=bool(cfg.tls_client_ca_file))
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(context))


def _inference_cluster(name: str, targets: list[str], policy: UpstreamPolicy) -> Cluster:
    """A cluster of inference replicas: balanced, health-checked, outlier-ejected, circuit-broken."""
    cluster = _cluster(name, targets, http2=False)
    cluster.lb_policy = ClusterLbPolicy.LEAST_REQUEST if policy.lb_policy == "least_request" \
        else ClusterLbPolicy.ROUND_ROBIN
    interval = _seconds(policy.health_check_interval_s)
    cluster.health_checks = [HealthCheck(
        timeout=_seconds(policy.health_check_timeout_s), interval=interval,
        # An idle cluster is checked as often as a busy one: a replica that comes back rejoins at once.
        no_traffic_interval=interval, unhealthy_threshold=policy.unhealthy_threshold,
        healthy_threshold=policy.healthy_threshold,
        http_health_check=HealthCheckHttpHealthCheck(path=policy.health_check_path))]
    cluster.outlier_detection = OutlierDetection(
        consecutive_5xx=policy.outlier_consecutive_5xx, interval=_seconds(policy.outlier_interval_s),
        base_ejection_time=_seconds(policy.outlier_base_ejection_s),
        max_ejection_percent=policy.outlier_max_ejection_percent)
    cluster.circuit_breakers = CircuitBreakers(thresholds=[CircuitBreakersThresholds(
        max_connections=policy.max_connections, max_pending_requests=policy.max_pending_requests,
        max_requests=policy.max_requests,
        retry_budget=CircuitBreakersThresholdsRetryBudget(
            budget_percent=Percent(value=policy.retry_budget_percent),
            min_retry_concurrency=policy.min_retry_concurrency))])
    return cluster


def model_cluster(model: str) -> str:
    """The cluster name of another model's replicas."""
    return f"{UPSTREAM_CLUSTER}_{re.sub(r'[^A-Za-z0-9_]', '_', model)}"


def _route(cluster: str, cfg: EnvoyConfig, headers: list[HeaderMatcher] | None = None) -> Route:
    policy = cfg.upstream
    retry = RetryPolicy(
        retry_on=RETRY_ON, num_retries=policy.retries,
        retriable_headers=[HeaderMatcher(name=NOT_STARTED_HEADER, present_match=True)],
        # Each retry goes to a replica this request has not tried yet.
        retry_host_predicate=[RetryPolicyRetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts", typed_config=AnyMessage.pack(PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=5,
        retry_back_off=RetryPolicyRetryBackOff(base_interval=_seconds(0.025), max_interval=_seconds(0.25)))
    return Route(match=RouteMatch(prefix="/", headers=headers or []), route=RouteAction(
        cluster=cluster, timeout=_seconds(cfg.upstream_timeout_s), retry_policy=retry))


def _access_log(path: str) -> AccessLog:
    return AccessLog(name="envoy.access_loggers.file", typed_config=AnyMessage.pack(FileAccessLog(
        path=path, log_format=SubstitutionFormatString(json_format=Struct.from_dict(ACCESS_LOG_FORMAT)))))


def build_bootstrap(cfg: EnvoyConfig) -> Bootstrap:
    if cfg.authz_transport not in ("grpc", "http"):
        raise ValueError(f"envoy.authz_transport must be 'grpc' or 'http', not {cfg.authz_transport!r}")
    http_mode = cfg.authz_transport == "http"
    ext_authz = ExtAuthz(
        **({"http_service": _http_service(cfg)} if http_mode else {"grpc_service": GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER), timeout=_seconds(cfg.authz_timeout_s))}),
        transport_api_version=2,  # V3
        with_request_body=BufferSettings(max_request_bytes=cfg.max_request_bytes, allow_partial_message=True),
        failure_mode_allow=cfg.failure_mode_allow,
        status_on_error=HttpStatus(code=StatusCode(cfg.status_on_error)),
        include_peer_certificate=bool(cfg.tls_client_ca_file),
        # Every client header reaches the sidecar (both transports) except the names of the
        # attributes the HTTP transport carries: Envoy alone sets those, a client cannot forge them.
        allowed_headers=ListStringMatcher(patterns=[StringMatcher(safe_regex=RegexMatcher(regex=".*"))]),
        disallowed_headers=_prefixes((http_contract.CARRIED_PREFIX,)),
        # The policy's x-kernelgate-model header picks the model's cluster.
        clear_route_cache=bool(cfg.model_upstreams),
    )
    model_routes = [_route(model_cluster(model), cfg, [HeaderMatcher(
        name=MODEL_HEADER, string_match=StringMatcher(exact=model))]) for model in cfg.model_upstreams]
    route_config = RouteConfiguration(name="kernelgate", virtual_hosts=[VirtualHost(
        name="inference", domains=["*"], include_attempt_count_in_response=True,
        routes=[*model_routes, _route(UPSTREAM_CLUSTER, cfg)])])
    hcm = HttpConnectionManager(
        stat_prefix="ingress_http",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=route_config,
        # The path the policy sees is the path the upstream routes on.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        use_remote_address=True,
        generate_request_id=True,
        local_reply_config=_status_stand_ins() if http_mode and cfg.authz_enabled else None,
        access_log=[_access_log(cfg.access_log_path)] if cfg.access_log_path else [],
        http_filters=[
            *([HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(ext_authz))]
              if cfg.authz_enabled else []),
            HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())),
        ],
    )
    clusters = [
        *([_cluster(AUTHZ_CLUSTER, [cfg.authz_address], http2=not http_mode)] if cfg.authz_enabled else []),
        _inference_cluster(UPSTREAM_CLUSTER, cfg.replicas, cfg.upstream),
        *(_inference_cluster(model_cluster(model), targets, cfg.upstream)
          for model, targets in cfg.model_upstreams.items()),
    ]
    if cfg.otlp_address:
        hcm.tracing = HttpConnectionManagerTracing(
            random_sampling=Percent(value=cfg.trace_sampling_percent),
            spawn_upstream_span=True,
            provider=TracingProvider(name="envoy.tracers.opentelemetry", typed_config=AnyMessage.pack(
                OpenTelemetryConfig(grpc_service=GrpcService(
                    envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=_seconds(1.0)),
                    service_name=cfg.service_name))))
        clusters.append(_cluster(OTLP_CLUSTER, [cfg.otlp_address], http2=True))
    listener = Listener(
        name="ingress",
        address=_address(f"{cfg.listen_host}:{cfg.listen_port}"),
        filter_chains=[FilterChain(filters=[Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(hcm))],
            transport_socket=_downstream_tls(cfg))],
    )
    return Bootstrap(
        admin=Admin(address=_address(f"{cfg.admin_host}:{cfg.admin_port}")),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


# JSON names betterproto spells unlike protoc (it capitalises a letter after a digit) -> Envoy's.
_JSON_NAMES = {"consecutive5Xx": "consecutive5xx"}


def _proto_json_names(data: Any) -> Any:
    if isinstance(data, dict):
        return {_JSON_NAMES.get(k, k): _proto_json_names(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_proto_json_names(v) for v in data]
    return data


def render(cfg: EnvoyConfig) -> dict[str, Any]:
    """The bootstrap as a plain dict (Envoy reads it as YAML or JSON)."""
    return _proto_json_names(build_bootstrap(cfg).to_dict())
