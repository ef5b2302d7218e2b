"""The Envoy bootstrap, built from envoy-data-plane's typed messages.

One function makes it for the local stack, the tests and the Kubernetes ConfigMap,
so all three run exactly the same Envoy configuration.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter, AndFilter, ComparisonFilter, ComparisonFilterOp, ResponseFlagFilter, StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterLbPolicy
from envoy_data_plane.envoy.config.core.v3 import (
    Address, GrpcService, GrpcServiceEnvoyGrpc, HeaderValue, RuntimeUInt32, Http1ProtocolOptions, Http2ProtocolOptions, HttpUri, Pipe,
    SocketAddress,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig
from envoy_data_plane.envoy.config.trace.v3 import TracingHttp as TracingProvider
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest, AuthorizationResponse, BufferSettings, ExtAuthz, HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager, HttpConnectionManagerCodecType, HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpConnectionManagerTracing, HttpFilter, LocalReplyConfig, ResponseMapper,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions, HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar import http_transport
from common.ports import AUTHZ_ADDRESS, ENVOY_ADMIN_PORT, ENVOY_PORT, INFERENCE_ADDRESS, LOOPBACK

AUTHZ_CLUSTER = "kernelgate_authz"
UPSTREAM_CLUSTER = "inference"
OTLP_CLUSTER = "otel_collector"


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
    # Completions can stream for minutes; 0 disables the route timeout.
    upstream_timeout_s: float = 600.0
    # Bytes of the body sent to ext_authz; larger bodies arrive cut (x-envoy-auth-partial-body).
    max_request_bytes: int = 1 << 20
    # host:port of an OTLP/gRPC collector (Jaeger); "" disables tracing.
    otlp_address: str = ""
    service_name: str = "kernelgate-envoy"
    trace_sampling_percent: float = 100.0


def _address(target: str) -> Address:
    if target.startswith("unix:"):
        return Address(pipe=Pipe(path=target[len("unix:"):]))
    host, _, port = target.rpartition(":")
    return Address(socket_address=SocketAddress(address=host.strip("[]"), port_value=int(port)))


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _cluster(name: str, target: str, http2: bool, timeout_s: float = 1.0) -> Cluster:
    protocol = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()) if http2 else HttpProtocolOptionsExplicitHttpConfig(
        http_protocol_options=Http1ProtocolOptions()))
    is_ip = target.startswith("unix:") or target.rpartition(":")[0].replace(".", "").isdigit()
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if is_ip else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_seconds(timeout_s),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(protocol)},
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(target)))])]),
    )


def _prefixes(prefixes: tuple[str, ...]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(prefix=p) for p in prefixes])


def _http_service(cfg: EnvoyConfig) -> HttpService:
    """Envoy's HTTP ext_authz client, configured for sidecar/http_transport.py."""
    return HttpService(
        server_uri=HttpUri(uri=f"http://{AUTHZ_CLUSTER}", cluster=AUTHZ_CLUSTER, timeout=_seconds(cfg.authz_timeout_s)),
        path_prefix=http_transport.PATH_PREFIX,
        authorization_request=AuthorizationRequest(
            # every client header, as the gRPC CheckRequest carries them
            allowed_headers=ListStringMatcher(patterns=[StringMatcher(safe_regex=RegexMatcher(regex=".*"))]),
            headers_to_add=[HeaderValue(key=k, value=v) for k, v in http_transport.CARRIED.items()]),
        authorization_response=AuthorizationResponse(
            allowed_upstream_headers=_prefixes(http_transport.UPSTREAM_HEADER_PREFIXES),
            allowed_client_headers_on_success=_prefixes(http_transport.CLIENT_HEADER_PREFIXES)),
    )


def _status_stand_ins() -> LocalReplyConfig:
    """ext_authz replies with a stand-in status (http_transport.STATUS_STAND_INS) -> the real 5xx."""
    return LocalReplyConfig(mappers=[ResponseMapper(
        filter=AccessLogFilter(and_filter=AndFilter(filters=[
            AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(
                op=ComparisonFilterOp.EQ,
                value=RuntimeUInt32(default_value=stand_in, runtime_key=f"kernelgate.authz_status_{stand_in}")))),
            AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["UAEX"]))])),
        status_code=status) for status, stand_in in http_transport.STATUS_STAND_INS.items()])


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
    )
    route_config = RouteConfiguration(name="kernelgate", virtual_hosts=[VirtualHost(
        name="inference", domains=["*"],
        routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(
            cluster=UPSTREAM_CLUSTER, timeout=_seconds(cfg.upstream_timeout_s)))])])
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
        http_filters=[
            *([HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(ext_authz))]
              if cfg.authz_enabled else []),
            HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())),
        ],
    )
    clusters = [
        *([_cluster(AUTHZ_CLUSTER, cfg.authz_address, http2=not http_mode)] if cfg.authz_enabled else []),
        _cluster(UPSTREAM_CLUSTER, cfg.upstream_address, http2=False),
    ]
    if cfg.otlp_address:
        hcm.tracing = HttpConnectionManagerTracing(
            random_sampling=Percent(value=cfg.trace_sampling_percent),
            spawn_upstream_span=True,
            provider=TracingProvider(name="envoy.tracers.opentelemetry", typed_config=AnyMessage.pack(
                OpenTelemetryConfig(grpc_service=GrpcService(
                    envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=_seconds(1.0)),
                    service_name=cfg.service_name))))
        clusters.append(_cluster(OTLP_CLUSTER, cfg.otlp_address, http2=True))
    listener = Listener(
        name="ingress",
        address=_address(f"{cfg.listen_host}:{cfg.listen_port}"),
        filter_chains=[FilterChain(filters=[Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(hcm))])],
    )
    return Bootstrap(
        admin=Admin(address=_address(f"{cfg.admin_host}:{cfg.admin_port}")),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


def render(cfg: EnvoyConfig) -> dict[str, Any]:
    """The bootstrap as a plain dict (Envoy reads it as YAML or JSON)."""
    return build_bootstrap(cfg).to_dict()
