"""The sidecar as a gRPC server: Check, health, reflection, and SIGTERM draining in-flight checks."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.stack import ACME_KEY, AuthzStack


def completion_check(key: str = ACME_KEY, prompt: str = "hi") -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "POST", "/v1/completions", "localhost"
    http.headers["x-api-key"] = key
    http.headers["content-type"] = "application/json"
    http.body = '{"model": "tiny-gpt2", "prompt": "%s", "max_tokens": 4}' % prompt
    return req


async def wait_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 15.0) -> None:
    """The sidecar reports SERVING once started (OPA's revision read); until then NOT_SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert asyncio.get_running_loop().time() < deadline, "never became SERVING"
        await asyncio.sleep(0.05)


@pytest.fixture
def sidecar(tmp_path: Path):
    stack = AuthzStack(tmp_path, authz_overrides={"opa": {"timeout_s": 10}})
    stack.start_opa()
    stack.start_sidecar()
    yield stack
    stack.stop()


async def test_check_health_and_reflection(sidecar: AuthzStack):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.authz_port}") as channel:
        resp = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(completion_check())
        assert resp.status.code == 0 and resp.HasField("ok_response")
        names = {h.header.key for h in resp.ok_response.headers}
        assert {"x-kernelgate-tenant", "x-kernelgate-decision-id"} <= names
        denied = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(completion_check(key="nope"))
        assert denied.denied_response.status.code == 401

        await wait_serving(channel, "envoy.service.auth.v3.Authorization")

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")])):
            services = {s.name for s in answer.list_services_response.service}
            assert "envoy.service.auth.v3.Authorization" in services
            break


async def test_sigterm_drains_in_flight_checks(sidecar: AuthzStack):
    """Checks already in flight when SIGTERM arrives still get their answer."""
    opa = sidecar.procs["opa"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.authz_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await wait_serving(channel)
        os.kill(opa.popen.pid, signal.SIGSTOP)  # hold the checks inside the sidecar
        try:
            in_flight = [asyncio.ensure_future(stub.Check(completion_check(prompt=f"p{i}"))) for i in range(5)]
            await asyncio.sleep(1.5)  # all five reach the sidecar, even on a busy machine
            sidecar.procs["sidecar"].popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in in_flight), [f.result() if not f.exception() else f.exception() for f in in_flight if f.done()]
        finally:
            os.kill(opa.popen.pid, signal.SIGCONT)
        answers = await asyncio.gather(*in_flight, return_exceptions=True)
    # OPA answered after SIGTERM (within the 10 s timeout): every in-flight check got a real decision
    assert all(isinstance(a, external_auth_pb2.CheckResponse) for a in answers), answers
    assert all(a.HasField("ok_response") for a in answers), answers
    assert sidecar.procs["sidecar"].popen.wait(10) == 0


def test_workers_need_shared_budgets():
    from common.settings import ConfigError, build
    from sidecar.config import SidecarConfig

    with pytest.raises(ConfigError, match="own budget"):
        build(SidecarConfig, {"workers": 2})
    assert build(SidecarConfig, {"workers": 2, "ratelimit": {"backend": "redis"}}).workers == 2


async def test_two_workers_share_one_port(tmp_path: Path, redis_url: str):
    stack = AuthzStack(tmp_path, authz_overrides={"workers": 2}, redis_url=redis_url)
    try:
        stack.start_opa()
        proc = stack.start_sidecar()
        workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.popen.pid
                   and b"spawn_main" in _cmdline(p)]
        assert len(workers) == 1, "a second worker process serves the same port"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.authz_port}") as channel:
            resp = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(completion_check())
            assert resp.HasField("ok_response")
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(20) == 0
        assert not workers[0].exists(), "SIGTERM stops every worker"
    finally:
        stack.stop()


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def _parent(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
