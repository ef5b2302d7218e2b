"""One trace per request, read back from a real Jaeger v2: Envoy -> ext_authz sidecar -> upstream.

Real Envoy (OpenTelemetry tracer), the real sidecar (``kernelgate authz``, telemetry on), real
OPA, and either the echo upstream or the real inference server (``kernelgate serve`` on CPU),
all exporting OTLP to one Jaeger; assertions are on the trees Jaeger's query API returns.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernelgate.envoy_config import EnvoyConfig, render
from tests import procs
from tests.e2e.test_authz_e2e import COMPLETION, post
from tests.jaeger import Jaeger, Span, Trace, pytest_jaeger
from tests.replica_stack import write_policy_data
from tests.stack import ACME_KEY, GLOBEX_KEY, AuthzStack

jaeger = pytest.fixture(scope="module")(pytest_jaeger)

ENVOY, AUTHZ, INFERENCE = "kernelgate-envoy", "kernelgate-authz", "kernelgate-inference"
INGRESS = "ingress"
CHECK_EGRESS = "async envoy.service.auth.v3.Authorization.Check egress"
ROUTER_EGRESS = "router inference egress"
FORCE_HEADER = "x-kernelgate-trace-kernels"

# A policy that lets tenant acme ask for kernel traces (the contract in docs/tracing.md): the
# sidecar passes the header upstream only because the decision's headers carry it.
GRANT_KERNEL_TRACES = '''
_kernel_trace_header := {"x-kernelgate-trace-kernels": "1"} if {
	_tenant_name == "acme"
	input.attributes.request.http.headers["x-kernelgate-trace-kernels"] == "1"
} else := {}
'''


@dataclass
class TracedStack(AuthzStack):
    """AuthzStack with the top-level ``telemetry:`` section, Envoy's tracer flushing fast, and
    optionally the real inference server as the upstream."""

    telemetry: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["telemetry"] = self.telemetry
        if self.inference is not None:
            config["inference"] = {**self.inference, "listen": {"host": "127.0.0.1", "port": self.upstream_port}}
        return config

    def grant_kernel_traces(self) -> None:
        """Patch this stack's copy of the policy with GRANT_KERNEL_TRACES."""
        rego = self.policy_dir / "authz.rego"
        headers = '{"x-kernelgate-tenant": _tenant_name, "x-kernelgate-tier": _tier_name, ' \
                  '"x-kernelgate-model": _model_name}'
        text = rego.read_text()
        assert text.count(headers) == 1, "policy layout changed: update grant_kernel_traces"
        rego.write_text(text.replace(headers, f"object.union({headers}, _kernel_trace_header)")
                        + GRANT_KERNEL_TRACES)

    def start(self) -> "TracedStack":
        if self.inference is None:
            super().start()
            return self
        self.start_opa()
        env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        proc = procs.start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config",
                                         str(self.write_config())], self.logs, env=env)
        self.procs["inference"] = proc
        self.start_sidecar()
        self.start_envoy()
        procs.wait_http(f"http://127.0.0.1:{self.upstream_port}/readyz", proc=proc, timeout=180)
        return self

    def start_envoy(self) -> procs.Proc:
        bootstrap = render(EnvoyConfig(**self.config()["envoy"]))
        # Envoy's tracer exports every 5 s by default; tests read traces back at once.
        bootstrap["layered_runtime"] = {"layers": [{"name": "test_static", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": 100, "tracing.opentelemetry.min_flush_spans": 1}}]}
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap))
        proc = procs.start("envoy", [procs.find_binary("envoy"), "-c", str(path), "--use-dynamic-base-id",
                                     "--log-level", "warn", "--concurrency", "1"], self.logs)
        procs.wait_http(f"http://127.0.0.1:{self.admin_port}/ready", proc=proc)
        self.procs["envoy"] = proc
        return proc


@pytest.fixture
def make_traced(tmp_path: Path, jaeger: Jaeger) -> Iterator:
    stacks: list[TracedStack] = []

    def factory(**kwargs: Any) -> TracedStack:
        workdir = tmp_path / f"stack{len(stacks)}"
        workdir.mkdir()
        stack = TracedStack(workdir, envoy_overrides={"otlp_address": jaeger.otlp_grpc_address},
                            telemetry={"enabled": True, "otlp_endpoint": jaeger.otlp_grpc_address,
                                       "export_delay_s": 0.1, **kwargs.pop("telemetry", {})}, **kwargs)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


def has(*names: str):
    return lambda t: all(t.named(n) for n in names)


def check_under_envoy(trace: Trace) -> tuple[Span, Span]:
    """Envoy's ingress span -> its ext_authz client span -> the sidecar's ext_authz.check."""
    ingress = trace.one(INGRESS, ENVOY)
    assert ingress.kind == "server"
    check = trace.one("ext_authz.check", AUTHZ)
    assert check.kind == "server"
    egress = trace.parent(check)
    assert egress is not None and egress.name == CHECK_EGRESS and egress.service == ENVOY, trace.outline()
    assert egress.kind == "client" and trace.parent(egress) == ingress
    assert ingress.start_ns <= egress.start_ns <= check.start_ns <= check.end_ns <= egress.end_ns + 1_000_000
    return ingress, check


# --- (a) allowed, echo upstream -------------------------------------------------------------------------
async def test_allowed_request_is_one_trace_from_envoy_through_the_check(make_traced, jaeger: Jaeger) -> None:
    stack = make_traced().start()
    status, _, echo = await post(stack.url, headers={"x-api-key": ACME_KEY})
    assert status == 200, echo
    traceparent = echo["headers"]["traceparent"]
    trace = jaeger.wait_trace(trace_id_of(traceparent),
                              until=has(INGRESS, ROUTER_EGRESS, "ext_authz.check", "ratelimit"))
    assert trace.services() == {ENVOY, AUTHZ}
    ingress, check = check_under_envoy(trace)
    assert [s.name for s in trace.children(check)] == ["identity", "opa.query", "ratelimit"]
    a = check.attributes
    assert (a["kernelgate.tenant"], a["kernelgate.decision"], a["kernelgate.reason"]) == ("acme", "allow", "ok")
    assert a["kernelgate.decision_id"] == stack.decisions()[-1]["decision_id"]
    assert len(a["kernelgate.policy_revision"]) == 16
    assert a["kernelgate.cache_hit"] is False
    assert a["kernelgate.ratelimit.requests.remaining"] == 599
    assert "kernelgate.deny_reason" not in a
    # the upstream was called from Envoy's router span, in the same trace
    router = trace.one(ROUTER_EGRESS, ENVOY)
    assert trace.parent(router) == ingress and router.span_id == traceparent.split("-")[2]
    assert ingress.attributes["http.status_code"] == "200"
    assert check.end_ns <= router.start_ns


# --- (b) denied: the trace ends at the check -------------------------------------------------------------
async def test_denied_request_trace_ends_at_the_check_with_the_reason(make_traced, jaeger: Jaeger) -> None:
    stack = make_traced().start()
    status, _, payload = await post(stack.url, body={**COMPLETION, "model": "gpt2-medium"},
                                    headers={"x-api-key": GLOBEX_KEY})
    assert (status, payload["error"]["code"]) == (403, "model_not_allowed")
    trace = jaeger.wait_span_trace(AUTHZ, "ext_authz.check", "kernelgate.decision_id",
                                   stack.decisions()[-1]["decision_id"], until=has(INGRESS, "opa.query"))
    ingress, check = check_under_envoy(trace)
    a = check.attributes
    assert (a["kernelgate.decision"], a["kernelgate.deny_reason"], a["kernelgate.tenant"]) == \
        ("deny", "model_not_allowed", "globex")
    assert a["http.response.status_code"] == 403
    assert not trace.named(ROUTER_EGRESS), "a denied request must not reach the upstream"
    assert trace.children(ingress) == [trace.parent(check)]
    assert [s.name for s in trace.children(check)] == ["identity", "opa.query"]
    assert ingress.attributes["http.status_code"] == "403"
    assert ingress.attributes["response_flags"] == "UAEX"  # unauthorized by external service


async def test_unauthenticated_request_trace_has_no_policy_query(make_traced, jaeger: Jaeger) -> None:
    stack = make_traced().start()
    status, _, payload = await post(stack.url, headers={"x-api-key": "kg-not-a-key"})
    assert (status, payload["error"]["code"]) == (401, "invalid_api_key")
    trace = jaeger.wait_span_trace(AUTHZ, "ext_authz.check", "kernelgate.decision_id",
                                   stack.decisions()[-1]["decision_id"], until=has(INGRESS))
    _, check = check_under_envoy(trace)
    assert check.attributes["kernelgate.deny_reason"] == "invalid_api_key"
    assert "kernelgate.tenant" not in check.attributes
    assert [s.name for s in trace.children(check)] == ["identity"]


# --- the force-header contract ------------------------------------------------------------------------------
async def test_kernel_trace_header_reaches_the_upstream_only_when_the_policy_grants_it(make_traced) -> None:
    stock = make_traced().start()
    _, _, echo = await post(stock.url, headers={"x-api-key": ACME_KEY, FORCE_HEADER: "1"})
    assert FORCE_HEADER not in echo["headers"], "a client must not force kernel traces by itself"
    granting = make_traced()
    granting.grant_kernel_traces()
    granting.start()
    _, _, echo = await post(granting.url, headers={"x-api-key": ACME_KEY, FORCE_HEADER: "1"})
    assert echo["headers"][FORCE_HEADER] == "1"
    _, _, echo = await post(granting.url, headers={"x-api-key": ACME_KEY})
    assert FORCE_HEADER not in echo["headers"], "granted on request only"
    _, _, echo = await post(granting.url, headers={"x-api-key": GLOBEX_KEY, FORCE_HEADER: "1"})
    assert FORCE_HEADER not in echo["headers"], "other tenants are not granted"


# --- (c) the real inference server --------------------------------------------------------------------------
async def test_inference_request_is_one_trace_down_to_the_forward_pass(make_traced, jaeger: Jaeger) -> None:
    stack = make_traced(
        inference={"model": {"device": "cpu", "use_deepspeed": True}, "batching": {"max_wait_ms": 0}},
        # spans exported by child processes of the sidecar and the server (otel/export_process.py)
        telemetry={"decode_step_spans_every": 1, "export_process": True,
                   "kernels": {"ratio": 0.0, "activities": "cpu", "steps_per_request": 3,
                               "max_spans_per_trace": 1000, "fold_after": 2}})
    stack.grant_kernel_traces()
    # A rollout with one version: the policy names it, and both the check and the request span carry it.
    write_policy_data(stack, lambda data: data["kernelgate"].update(rollouts={"tiny-gpt2": {"weights": {"v1": 1}}}))
    stack.start()
    # 24 tokens: the third captured pass is derived once the first decode's template is made (a few steps)
    status, _, body = await post(stack.url, body={**COMPLETION, "max_tokens": 24, "ignore_eos": True},
                                 headers={"x-api-key": ACME_KEY, FORCE_HEADER: "1"})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 24
    request_name = "POST /v1/completions"
    trace = jaeger.wait_span_trace(
        INFERENCE, request_name, "gen_ai.response.id", body["id"],
        until=lambda t: has(INGRESS, ROUTER_EGRESS, "ext_authz.check", "preprocess", "queue")(t)
        and len(t.named("engine.step")) == 24 and len(t.named("gpu.forward")) == 3)
    trace_id = trace.trace_id
    assert trace.services() == {ENVOY, AUTHZ, INFERENCE}
    ingress, check = check_under_envoy(trace)
    assert check.attributes["kernelgate.decision"] == "allow"
    assert check.attributes["kernelgate.model.version"] == "v1"
    # Envoy's router span -> the inference server's request span
    request = trace.one(request_name, INFERENCE)
    assert request.kind == "server"
    router = trace.parent(request)
    assert router is not None and router.name == ROUTER_EGRESS and trace.parent(router) == ingress
    a = request.attributes
    assert a["gen_ai.request.model"] == "tiny-gpt2" and a["gen_ai.request.max_tokens"] == 24
    assert a["gen_ai.usage.output_tokens"] == 24 and a["gen_ai.usage.input_tokens"] > 0
    assert a["kernelgate.tenant"] == "acme" and a["kernelgate.model.version"] == "v1"
    assert a["kernelgate.kernels.capture"] == "forced"
    # Which replica served it: the server names itself, Envoy's upstream span names the host it chose.
    assert a["kernelgate.replica.id"].endswith(f":{stack.upstream_port}")
    assert router.attributes["upstream_address"] == f"127.0.0.1:{stack.upstream_port}"
    for name in ("preprocess", "queue"):
        child = trace.one(name, INFERENCE)
        assert trace.parent(child) == request
    # every step of this request: in its trace and linked to its span
    steps = sorted(trace.named("engine.step"), key=lambda s: s.start_ns)
    assert [s.attributes["kernelgate.step.phase"] for s in steps] == ["prefill"] + ["decode"] * 23
    for step in steps:
        assert trace.parent(step) == request
        assert [(link.trace_id, link.span_id) for link in step.links] == [(trace_id, request.span_id)]
    # three passes were captured: the prefill and the first decode recorded, a later decode of the same
    # shape derived from that one (docs/tracing.md); operators hang under a forward span under its step
    forwards = sorted(trace.named("gpu.forward"), key=lambda s: s.start_ns)
    step_at = {s.attributes["kernelgate.step.index"]: s for s in steps}
    assert [trace.parent(f) for f in forwards] == [step_at[f.attributes["kernelgate.step.index"]] for f in forwards]
    assert [f.attributes["kernelgate.kernels.source"] for f in forwards] == ["recorded", "recorded", "derived"]
    assert trace.parent(forwards[1]) == steps[1]
    derived = forwards[2].attributes
    assert derived["kernelgate.kernels.derived_from.step_index"] == forwards[1].attributes["kernelgate.step.index"]
    assert derived["kernelgate.kernels.graph_key"] == forwards[1].attributes["kernelgate.kernels.graph_key"]
    assert [(link.trace_id, link.span_id) for link in forwards[2].links] == [(trace_id, forwards[1].span_id)]
    assert all(k.attributes["kernelgate.kernel.derived"] is True for k in trace.children(forwards[2]))
    assert not any("kernelgate.kernel.derived" in k.attributes for k in trace.children(forwards[1]))
    for forward in forwards:
        kernels = trace.children(forward)
        assert kernels and forward.attributes["kernelgate.kernels.activities"] == "cpu"
        assert forward.attributes["kernelgate.kernels.count"] >= len(kernels)
        assert {"aten::addmm", "aten::linear"} & {k.attributes["gpu.kernel.name"] for k in kernels}
        for k in kernels:
            assert forward.start_ns <= k.start_ns <= k.end_ns <= forward.end_ns, (
                forward.attributes, k.attributes, forward.start_ns, forward.end_ns, k.start_ns, k.end_ns)
        step = trace.parent(forward)
        assert step.start_ns <= forward.start_ns
    assert forwards[0].attributes["kernelgate.step.phase"] == "prefill"
    # what the request cost on the GPU: its share of each profiled pass, summed on its own span
    shares = [f.attributes["kernelgate.gpu.request_share_ns"] for f in forwards]
    assert shares == [f.attributes["kernelgate.kernels.gpu_time_ns"] for f in forwards]  # alone in its passes
    assert a["kernelgate.gpu.request_share_ns"] == sum(shares) > 0
    # the same server, a request not granted the header: its steps are traced, its forward passes are not
    status, _, body = await post(stack.url, body={**COMPLETION, "max_tokens": 2},
                                 headers={"x-api-key": GLOBEX_KEY, FORCE_HEADER: "1"})
    assert status == 200, body
    plain = jaeger.wait_span_trace(INFERENCE, request_name, "gen_ai.response.id", body["id"],
                                   until=lambda t: len(t.named("engine.step")) == 2 and t.named(INGRESS))
    assert "kernelgate.kernels.capture" not in plain.one(request_name).attributes
    assert not plain.named("gpu.forward")
