"""Composition root of the inference server: builds the parts, runs them, drains on SIGTERM.

``run(config)`` blocks until SIGTERM/SIGINT, then stops accepting connections, lets
in-flight requests finish (up to ``limits.drain_timeout_s``), stops the engine and
returns, so the process exits 0. ``build_app`` is the same wiring without the listener,
for tests. The process is ``kernelgate serve`` (kernelgate/cli.py): it loads the config
through the one loader (``kernelgate.config.load``) and passes the ``inference`` section in.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry

from inference.api import STATE, ServerState, create_app
from inference.config import BatchingConfig, InferenceConfig, ModelConfig, VersionConfig
from inference.genai_metrics import GenAIMetrics
from inference.openai.serving import GenerationServing
from inference.usage import UsageReporter
from inference.metrics import InferenceMetrics
from inference.tracing import ForwardObserver, Tracing

log = logging.getLogger("kernelgate.inference.server")

REGISTRY = web.AppKey("kernelgate_model_registry", object)


def build_app(config: InferenceConfig, engine: object | None = None, *, encoder: object | None = None,
              tracing: Tracing | None = None, forward_observer: ForwardObserver | None = None) -> web.Application:
    """The application for ``config``; pass ``engine`` (and its metrics) to share one across apps.

    The served models live in a ``ModelRegistry`` (one engine per loaded version; the serving
    layer leases the active one per request). An engine passed in is served as version ``v1``
    of ``config.model.name``, started if needed but never stopped here (its owner does that);
    engines built here are started at application start-up and stopped at clean-up.
    """
    from inference.models.registry import ModelRegistry
    from inference.pacing import LoadPacer
    from inference.structured import GrammarTables

    tracing = tracing or Tracing()
    group = None
    preprocess_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgate-preprocess")
    metrics = engine.metrics if engine is not None else InferenceMetrics(CollectorRegistry())  # type: ignore[attr-defined]

    grammar_tables = GrammarTables()  # versions of one tokenizer share them (a hot swap builds none)

    def build_engine(model: ModelConfig, batching: BatchingConfig, pacer: LoadPacer | None) -> object:
        from inference.engine import Engine

        return Engine(model, batching, metrics, tracing, forward_observer=forward_observer,
                      beside_serving=pacer is not None, pacer=pacer, grammar_tables=grammar_tables)

    genai = GenAIMetrics()

    def build_service(model: str, version: VersionConfig, built: object) -> GenerationServing:
        def observe(ttft_s: float | None, error: str | None) -> None:
            registry.observe(model, version.version, ttft_s, error)

        return GenerationServing(built, preprocess_executor, tracing, config.limits.retry_after_s,  # type: ignore[arg-type]
                                 genai, record=lambda prompts: registry.record(model, prompts), outcomes=observe,
                                 faults=version.faults)

    registry = ModelRegistry(config, build_engine, build_service)  # type: ignore[arg-type]
    metrics.watch_models(registry.status)
    if engine is None and config.model.tp_size > 1:
        from inference.engine import Engine
        from inference.tensor_parallel import TensorParallelGroup
        from common.processes import free_port

        group = TensorParallelGroup(config.model, config.batching, free_port())
        engine = Engine(config.model, config.batching, metrics, tracing, forward_observer=forward_observer,
                        load=group.load, wrap_runner=group.mirror, grammar_tables=grammar_tables)
        group.on_failure = engine.fail
        owned_tp_engine = engine
    else:
        owned_tp_engine = None
    if encoder is None and config.embeddings.enabled:
        from inference.embeddings import Encoder

        encoder = Encoder(config.embeddings)
    reporter = (UsageReporter(config.usage_report.address, config.usage_report.timeout_s)
                if config.usage_report.address else None)
    state = ServerState(config=config, registry=registry, encoder=encoder, metrics=metrics,  # type: ignore[arg-type]
                        tracing=tracing, preprocess_executor=preprocess_executor, usage=reporter,
                        replica_id=replica_id(config))
    app = create_app(state)
    app[REGISTRY] = registry

    async def start_models(_: web.Application) -> None:
        if engine is not None:
            registry.adopt(config.model.name, "v1", engine)  # type: ignore[arg-type]
        else:
            registry.start_in_background()
        if encoder is not None and not encoder.ready:
            encoder.start()  # type: ignore[attr-defined]

    async def stop_models(_: web.Application) -> None:
        loop = asyncio.get_running_loop()
        await registry.close(config.limits.drain_timeout_s)
        if owned_tp_engine is not None:
            await loop.run_in_executor(None, owned_tp_engine.shutdown, config.limits.drain_timeout_s)
        if group is not None:
            await loop.run_in_executor(None, group.close)
        if encoder is not None and hasattr(encoder, "close"):
            encoder.close()
        preprocess_executor.shutdown(wait=False, cancel_futures=True)
        if reporter is not None:
            await reporter.close()

    app.on_startup.append(start_models)
    app.on_cleanup.append(stop_models)
    return app


async def start_admin(app: web.Application, config: InferenceConfig) -> web.AppRunner | None:
    """The model-lifecycle admin API on its own port (``inference.admin``); None when it has no token."""
    from inference.models.admin import create_admin_app, read_token

    if not config.admin.enabled:
        return None
    token = read_token(config.admin)
    if token is None:
        log.warning("admin API off: no token in inference.admin.token_file or $%s", config.admin.token_env)
        return None
    runner = web.AppRunner(create_admin_app(app[REGISTRY], token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.admin.host, config.admin.port).start()
    log.info("model admin API on http://%s:%d", config.admin.host, config.admin.port)
    return runner


def replica_id(config: InferenceConfig) -> str:
    """``replica_id`` from the config, else host:port (in Kubernetes the host name is the pod's)."""
    return config.replica_id or f"{socket.gethostname()}:{config.listen.port}"


async def start_listening(app: web.Application, host: str, port: int, drain_timeout_s: float) -> web.AppRunner:
    """Start serving ``app``; client disconnects cancel their handlers (and so their requests)."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=drain_timeout_s, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def drain(runner: web.AppRunner, timeout_s: float) -> None:
    """Stop accepting, wait for in-flight requests (bounded), then close everything."""
    state = runner.app[STATE]
    state.draining = True
    for site in list(runner.sites):
        await site.stop()
    log.info("draining: %d request(s) in flight", state.in_flight)
    started = time.monotonic()
    try:
        await asyncio.wait_for(state.idle.wait(), timeout_s)
    except TimeoutError:
        log.warning("drain timeout (%.0fs): %d request(s) still in flight are cut off", timeout_s, state.in_flight)
    log.info("drained in %.2fs; shutting down", time.monotonic() - started)
    await runner.cleanup()


async def serve(config: InferenceConfig, tracing: Tracing | None = None,
                forward_observer: ForwardObserver | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = build_app(config, tracing=tracing, forward_observer=forward_observer)
    runner = await start_listening(app, config.listen.host, config.listen.port, config.limits.drain_timeout_s)
    admin = await start_admin(app, config)
    log.info("inference server listening on http://%s:%d (models %s)", config.listen.host, config.listen.port,
             ", ".join(m.name for m in config.served_models))
    await stop.wait()
    log.info("shutdown signal received")
    if admin is not None:
        await admin.cleanup()
    await drain(runner, config.limits.drain_timeout_s)


def run(config: InferenceConfig, tracing: Tracing | None = None,
        forward_observer: ForwardObserver | None = None) -> None:
    """Run the server in the foreground until SIGTERM (blocking); uvloop when installed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config, tracing, forward_observer))
    log.info("inference server stopped")
