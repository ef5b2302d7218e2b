"""GenAI semantic-convention metrics, read where a collector reads them: over OTLP/gRPC.

A real ``kernelgate serve`` process exports to the OTLP endpoint its traces use; a test
OTLP receiver (tests/otlp_receiver.py; Jaeger v2 keeps no metrics) takes the export.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import json
import urllib.error
import urllib.request

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from inference.genai_metrics import OTHER_TENANT, GenAIMetrics
from tests.otlp_receiver import OTLPReceiver
from tests.procs import free_port, start, wait_http

MODEL = "tiny-gpt2"
NAMES = {"gen_ai.server.request.duration": "s", "gen_ai.server.time_to_first_token": "s",
         "gen_ai.server.time_per_output_token": "s", "gen_ai.client.token.usage": "{token}"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver: OTLPReceiver) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp("genai-metrics")
    port = free_port()
    config = workdir / "kernelgate.yaml"
    config.write_text(yaml.safe_dump({
        "inference": {"listen": {"host": "127.0.0.1", "port": port},
                      "model": {"name": MODEL, "random_config": "tiny-gpt2", "device": "cpu", "use_deepspeed": False}},
        "telemetry": {"enabled": True, "otlp_endpoint": receiver.endpoint, "protocol": "grpc",
                      "metrics_interval_s": 0.5, "export_delay_s": 0.5}}))
    proc = start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config)], workdir,
                 env={"DS_ACCELERATOR": "cpu"})
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc, timeout=300)
    yield f"http://127.0.0.1:{port}"
    proc.stop()


class Reply:
    def __init__(self, status_code: int, text: str) -> None:
        self.status_code, self.text = status_code, text

    def json(self) -> dict:
        return json.loads(self.text)


def post(url: str, json_body: dict, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, data=json.dumps(json_body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return Reply(resp.status, resp.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read().decode())


def test_genai_metrics_reach_the_collector_with_their_names_units_and_attributes(server: str,
                                                                                 receiver: OTLPReceiver) -> None:
    headers = {"x-kernelgate-tenant": "acme"}
    body = post(f"{server}/v1/completions", headers=headers,
                json_body={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 5
    chat = post(f"{server}/v1/chat/completions", headers={"x-kernelgate-tenant": "globex"},
                json_body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
    # a choice may end early on the chat template's end-of-turn token: count what the stream reported
    chat_output = json.loads(chat.text.split("data: ")[-2])["usage"]["completion_tokens"]
    assert 2 <= chat_output <= 6
    missing = post(f"{server}/v1/completions",
                   json_body={"model": MODEL, "prompt": "x" * 5000, "max_tokens": 5})
    assert missing.status_code == 400  # refused before generation: no GenAI measurement

    def both_requests(latest: dict[str, dict]) -> bool:  # cumulative temporality: the last export has it all
        return set(NAMES) <= set(latest) and all(
            {p["attributes"]["gen_ai.operation.name"] for p in latest[name]["points"]} == {"text_completion", "chat"}
            for name in NAMES)

    latest = receiver.wait_for(both_requests)
    for name, unit in NAMES.items():
        metric = latest[name]
        assert metric["unit"] == unit and metric["kind"] == "histogram"
        assert metric["scope"] == "kernelgate.inference"
        assert metric["resource"]["service.name"] == "kernelgate-inference"
    by_op = {p["attributes"]["gen_ai.operation.name"]: p for p in latest["gen_ai.server.request.duration"]["points"]}
    assert set(by_op) == {"text_completion", "chat"}
    assert by_op["text_completion"]["attributes"]["kernelgate.tenant"] == "acme"
    assert by_op["chat"]["attributes"]["kernelgate.tenant"] == "globex"
    for point in by_op.values():
        assert point["attributes"]["gen_ai.request.model"] == MODEL
        assert point["attributes"]["gen_ai.provider.name"] == "kernelgate"
        assert int(point["count"]) == 1 and point["sum"] > 0
    tokens = {(p["attributes"]["gen_ai.operation.name"], p["attributes"]["gen_ai.token.type"]): p
              for p in latest["gen_ai.client.token.usage"]["points"]}
    assert tokens[("text_completion", "input")]["sum"] == 5
    assert tokens[("text_completion", "output")]["sum"] == 5
    assert tokens[("chat", "output")]["sum"] == chat_output  # n=2 choices: what they generated
    ttft = {p["attributes"]["gen_ai.operation.name"]: p for p in latest["gen_ai.server.time_to_first_token"]["points"]}
    assert int(ttft["chat"]["count"]) == 1 and int(ttft["text_completion"]["count"]) == 1
    tpot = latest["gen_ai.server.time_per_output_token"]["points"]
    assert sum(int(p["count"]) for p in tpot) == 2 and all(p["sum"] > 0 for p in tpot)


def test_tenant_attribute_is_bounded() -> None:
    reader = InMemoryMetricReader()
    genai = GenAIMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"), max_tenants=3)
    for i in range(10):
        genai.response(genai.attributes("chat", MODEL, MODEL, f"tenant-{i}"), 0.1, 3, 4, 0.05, 4, None)
    genai.response(genai.attributes("chat", MODEL, MODEL, "tenant-1"), 0.1, 3, 4, 0.05, 4, None)
    data = reader.get_metrics_data()
    [duration] = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                  if m.name == "gen_ai.server.request.duration"]
    counts = {p.attributes["kernelgate.tenant"]: p.count for p in duration.data.data_points}
    assert counts == {"tenant-0": 1, "tenant-1": 2, "tenant-2": 1, OTHER_TENANT: 7}


def test_file_protocol_writes_metrics_beside_the_traces(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from otel.config import TelemetryConfig
    from otel.otlp_file import OTLPFileMetricExporter, read_otlp_file
    from otel.setup import metrics_path

    traces = tmp_path / "spans.jsonl"
    assert metrics_path(str(traces)) == str(tmp_path / "spans.metrics.jsonl")
    assert metrics_path("/x/y/spans") == "/x/y/spans.metrics"
    assert TelemetryConfig(protocol="file", otlp_endpoint=str(traces)).metrics_interval_s > 0
    reader = PeriodicExportingMetricReader(OTLPFileMetricExporter(metrics_path(str(traces))),
                                           export_interval_millis=60_000)
    provider = MeterProvider(metric_readers=[reader])
    genai = GenAIMetrics(provider.get_meter("kernelgate.inference"))
    genai.first_token(genai.attributes("chat", MODEL, MODEL, "acme"), 0.02)
    provider.shutdown()  # flushes: one export request, one JSON line
    [batch] = list(read_otlp_file(metrics_path(str(traces))))
    names = {m["name"] for rm in batch["resourceMetrics"] for sm in rm["scopeMetrics"] for m in sm["metrics"]}
    assert names == {"gen_ai.server.time_to_first_token"}


def test_metric_names_are_the_semantic_conventions() -> None:
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

    from otel import names

    assert names.METRIC_SERVER_REQUEST_DURATION == gen_ai_metrics.GEN_AI_SERVER_REQUEST_DURATION
    assert names.METRIC_SERVER_TIME_TO_FIRST_TOKEN == gen_ai_metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
    assert names.METRIC_SERVER_TIME_PER_OUTPUT_TOKEN == gen_ai_metrics.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN
    assert names.METRIC_CLIENT_TOKEN_USAGE == gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE
