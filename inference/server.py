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
from inference.usage import UsageReporter
from inference.config import InferenceConfig
from inference.metrics import InferenceMetrics
from inference.tracing import ForwardObserver, Tracing

log = logging.getLogger("kernelgate.inference.server")


def build_app(config: InferenceConfig, engine: object | None = None, *, encoder: object | None = None,
              tracing: Tracing | None = None, forward_observer: ForwardObserver | None = None) -> web.Application:
    """The application for ``config``; pass ``engine`` (and its metrics) to share one across apps.

    An engine passed in is started if needed but never stopped here (its owner does that);
    one built here is started at application start-up and stopped at clean-up.
    """
    tracing = tracing or Tracing()
    owns_engine = engine is None
    group = None
    if engine is None:
        from inference.engine import Engine

        metrics = InferenceMetrics(CollectorRegistry())
        if config.model.tp_size > 1:
            from inference.tensor_parallel import TensorParallelGroup
            from common.processes import free_port

            group = TensorParallelGroup(config.model, config.batching, free_port())
            engine = Engine(config.model, config.batching, metrics, tracing, forward_observer=forward_observer,
                            load=group.load, wrap_runner=group.mirror)
            group.on_follower_exit = engine.fail
        else:
            engine = Engine(config.model, config.batching, metrics, tracing, forward_observer=forward_observer)
    else:
        metrics = engine.metrics  # type: ignore[attr-defined]
    if encoder is None and config.embeddings.enabled:
        from inference.embeddings import Encoder

        encoder = Encoder(config.embeddings)
    preprocess_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgate-preprocess")
    reporter = (UsageReporter(config.usage_report.address, config.usage_report.timeout_s)
                if config.usage_report.address else None)
    state = ServerState(config=config, engine=engine, encoder=encoder, metrics=metrics,  # type: ignore[arg-type]
                        tracing=tracing, preprocess_executor=preprocess_executor, usage=reporter,
                        replica_id=replica_id(config))
    app = create_app(state)

    async def start_models(_: web.Application) -> None:
        if not getattr(engine, "started", False):
            engine.start()  # type: ignore[attr-defined]
        if encoder is not None and not encoder.ready:
            encoder.start()  # type: ignore[attr-defined]

    async def stop_models(_: web.Application) -> None:
        loop = asyncio.get_running_loop()
        if owns_engine:
            await loop.run_in_executor(None, engine.shutdown, config.limits.drain_timeout_s)  # type: ignore[attr-defined]
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
    log.info("inference server listening on http://%s:%d (model %s)", config.listen.host, config.listen.port,
             config.model.name)
    await stop.wait()
    log.info("shutdown signal received")
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
