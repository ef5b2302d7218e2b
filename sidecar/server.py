"""gRPC wiring: Authorization/Check, the settlement channel, grpc.health.v1, reflection;
SIGTERM drains.

``run(config)`` is what ``kernelgate authz`` calls. Everything the Check handler
needs is built here, once, and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, replace

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from common.gc_freeze import freeze_startup_objects
from sidecar.authorizer import Authorizer
from sidecar.config import SidecarConfig
from sidecar.decision import Decider, DecisionCache
from sidecar import http_transport
from sidecar.decision_log import DecisionLogger
from sidecar.identity import Authenticator
from sidecar.metrics import SidecarMetrics
from sidecar.opa import OpaPolicyClient
from sidecar.opa_wasm import WasmPolicyClient
from sidecar import response, settle_grpc
from sidecar.ratelimit import build_rate_limiter
from sidecar.ratelimit.count import ServerPromptCounter
from sidecar.settlement import Settlement
from sidecar.replicas import ReplicaWatcher
from sidecar.rollouts import RollbackWriter

log = logging.getLogger("kernelgate.authz")

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
# Health service name that reports whether every identity provider is reachable.
IDENTITY_HEALTH_SERVICE = "kernelgate.identity"


class MethodAwareReflection(reflection.aio.ReflectionServicer):
    """Reflection that also resolves method names (``pkg.Service.Method``).

    xds-protos registers upb descriptors, whose pool finds services but not their
    methods; grpcurl and ghz ask for the method, so fall back to its service.
    """

    def _file_containing_symbol(self, request, fully_qualified_name):
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response") and "." in fully_qualified_name:
            return super()._file_containing_symbol(request, fully_qualified_name.rsplit(".", 1)[0])
        return response


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer):
        self._authorizer = authorizer

    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return response.check_response(await self._authorizer.check(request, metadata))


@dataclass
class Sidecar:
    """The running pieces, so tests and ``run`` can start and stop them alike."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    authorizer: Authorizer
    decider: Decider
    authenticator: Authenticator
    closers: list
    background: list[asyncio.Task]
    stop_event: asyncio.Event
    port: int
    # Envoy's HTTP ext_authz listener (authz.http_listen), or None.
    http_server: http_transport.HttpAuthzServer | None = None


async def start(config: SidecarConfig) -> Sidecar:
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry)
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)

    authenticator = Authenticator(config.identity)
    metrics.watch_identity_providers(authenticator.provider_status)
    opa_client = WasmPolicyClient(config.opa) if config.opa.mode == "wasm" else OpaPolicyClient(config.opa)
    decider = Decider(config.opa, opa_client, DecisionCache(config.opa.cache_size, config.opa.cache_ttl_s))
    rate_limiter = build_rate_limiter(config.ratelimit)
    decision_log = DecisionLogger(config.decision_log)
    rollbacks = RollbackWriter(opa_client if isinstance(opa_client, OpaPolicyClient) else None,
                               metrics.canary_rollbacks, decider.refresh_revision)
    replicas = ReplicaWatcher(config.replicas, metrics, rollbacks)
    counter = (ServerPromptCounter(config.ratelimit.count_url, config.ratelimit.count_timeout_s)
               if rate_limiter is not None and config.ratelimit.count_url else None)
    authorizer = Authorizer(config, authenticator, decider, rate_limiter, decision_log, metrics,
                            saturation=replicas, prompt_counter=counter)
    settlement = (Settlement(rate_limiter, metrics, decision_log)
                  if rate_limiter is not None and config.ratelimit.settle else None)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if config.workers > 1 else 0),
                                      ("grpc.max_receive_message_length", 8 << 20)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationService(authorizer), server)
    services = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    if settlement is not None:
        # not listed for reflection: its messages are google.protobuf.Struct, no descriptor of its own
        server.add_generic_rpc_handlers((settle_grpc.handler(settlement),))
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):  # known from the first moment: NOT_SERVING, never NOT_FOUND
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(MethodAwareReflection(tuple(services)), server)
    with contextlib.suppress(Exception):
        # Before the port opens: the policy client's first evaluation is paid here. Paid by the first
        # check of a fresh process (a spawned worker too), it ran past opa.timeout_s on a loaded
        # machine and the check was refused (503) right after start-up. Bounded like the client's own
        # timeout: OPA may start after us, or hang, and start-up never waits on it for longer.
        async with asyncio.timeout(max(config.opa.timeout_s * 4, 1.0)):
            await decider.warm_up()
    port = server.add_insecure_port(config.listen)
    if port == 0 and not config.listen.startswith("unix:"):
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    http_server = None
    if config.http_listen:
        host, _, http_port = config.http_listen.rpartition(":")
        http_server = await http_transport.serve(authorizer.check, host.strip("[]") or "127.0.0.1", int(http_port),
                                                 reuse_port=config.workers > 1)

    stop_event = asyncio.Event()
    with contextlib.suppress(Exception):
        # OPA may start after us, or hang: never block start-up on it; the watcher catches up.
        async with asyncio.timeout(config.opa.timeout_s):
            await decider.refresh_revision()
    background = [asyncio.create_task(decider.watch_revision(stop_event), name="opa-revision"),
                  asyncio.create_task(authenticator.watch(stop_event), name="credential-reload"),
                  asyncio.create_task(_report_identity_health(health_servicer, authenticator, stop_event),
                                      name="identity-health"),
                  asyncio.create_task(replicas.run(stop_event), name="replica-load")]
    if settlement is not None:
        background.append(asyncio.create_task(settlement.run(stop_event), name="reservation-expiry"))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    freeze_startup_objects()
    closers = [opa_client.close, decision_log.close, authenticator.close]
    if counter is not None:
        closers.append(counter.close)
    if rate_limiter is not None:
        closers.append(rate_limiter.close)
    policy_source = config.opa.url if config.opa.mode == "server" else f"in process from {config.opa.wasm_bundle_file}"
    log.info("kernelgate authz listening on %s%s (policy: %s, rate limits %s)", config.listen,
             f" and HTTP ext_authz on {config.http_listen}" if config.http_listen else "", policy_source,
             config.ratelimit.backend if rate_limiter is not None else "off")
    return Sidecar(server, health_servicer, authorizer, decider, authenticator, closers, background,
                   stop_event, port, http_server)


async def _report_identity_health(health_servicer: health.aio.HealthServicer, authenticator: Authenticator,
                                  stop_event: asyncio.Event, interval_s: float = 1.0) -> None:
    """``kernelgate.identity``: NOT_SERVING while an identity provider is unreachable.

    The sidecar itself stays SERVING (cached keys and answers keep working); this service
    says that it is degraded, and the metrics say which provider and since when.
    """
    serving: bool | None = None
    while not stop_event.is_set():
        now_serving = not any(s.degraded for s in authenticator.provider_status())
        if now_serving != serving:
            serving = now_serving
            await health_servicer.set(IDENTITY_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if serving
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=interval_s)
        except TimeoutError:
            pass


async def stop(sidecar: Sidecar, grace_s: float) -> None:
    """Health goes NOT_SERVING, new checks are refused, in-flight ones finish (up to grace_s)."""
    await sidecar.health.enter_graceful_shutdown()
    if sidecar.http_server is not None:
        await asyncio.gather(sidecar.server.stop(grace_s), sidecar.http_server.drain(grace_s))
    else:
        await sidecar.server.stop(grace_s)
    sidecar.stop_event.set()
    for task in sidecar.background:
        task.cancel()
    await asyncio.gather(*sidecar.background, return_exceptions=True)
    for close in sidecar.closers:
        result = close()
        if asyncio.iscoroutine(result):
            await result


async def serve(config: SidecarConfig) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a SIGTERM during start-up still drains
        loop.add_signal_handler(sig, stopping.set)
    sidecar = await start(config)
    await stopping.wait()
    log.info("draining in-flight checks (up to %.1fs)", config.drain_s)
    await stop(sidecar, config.drain_s)
    log.info("stopped")


def _run_one(config: SidecarConfig) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


def run(config: SidecarConfig) -> None:
    """Serve in this process, plus ``workers - 1`` more processes on the same port.

    Python serves one check at a time per process; workers spread checks over cores
    (the kernel balances connections between SO_REUSEPORT sockets). Only the first
    process exposes metrics. SIGTERM to this process drains every worker.
    """
    if config.workers == 1:
        _run_one(config)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    extra = [context.Process(target=_run_one, args=(replace(config, metrics_listen=""),), daemon=False,
                             name=f"kernelgate-authz-{i}") for i in range(1, config.workers)]
    for proc in extra:
        proc.start()
    try:
        _run_one(config)
    finally:
        for proc in extra:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each worker drains its own in-flight checks
        for proc in extra:
            proc.join(config.drain_s + 5)
