"""Fixtures for the inference server tests: tiny random-weight engines and in-process servers.

Everything runs on CPU with the 2-layer ``tiny-gpt2`` model (loads in well under a second).
One engine is shared by the tests that only need a plain one; tests that need a special
engine (slow steps, tiny queue, gated loading) build their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from inference.config import InferenceConfig
from inference.engine import Engine
from inference.server import build_app, start_listening
from tests.inference.helpers import Served, started_engine, tiny_config


@pytest.fixture(scope="session")
def shared_engine() -> Iterator[Engine]:
    engine = started_engine(tiny_config())
    yield engine
    engine.shutdown(10)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """``await serve(config, engine=...)`` starts an app on a free loopback port."""
    runners: list[web.AppRunner] = []

    async def start(config: InferenceConfig | None = None, **kwargs: Any) -> Served:
        config = config or tiny_config()
        app = build_app(config, **kwargs)
        runner = await start_listening(app, "127.0.0.1", 0, config.limits.drain_timeout_s)
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return Served(url=f"http://{host}:{port}", app=app, runner=runner)

    yield start
    for runner in runners:
        await runner.cleanup()




@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory) -> Iterator[str]:
    """A real ``kernelgate serve`` process (tiny model) for fuzzing over real HTTP."""
    import sys

    import yaml

    from common.processes import free_port, start, wait_http

    workdir = tmp_path_factory.mktemp("hostile-http")
    port = free_port()
    config = workdir / "kernelgate.yaml"
    config.write_text(yaml.safe_dump({"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": {"name": "tiny-gpt2", "random_config": "tiny-gpt2", "device": "cpu", "use_deepspeed": False}}}))
    proc = start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config)],
                 workdir, env={"DS_ACCELERATOR": "cpu"})
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc, timeout=300)
    yield f"http://127.0.0.1:{port}"
    assert proc.popen.poll() is None, "the server must survive the fuzzing"
    proc.stop()
