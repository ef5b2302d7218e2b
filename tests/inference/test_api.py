"""The HTTP front end: OpenAI shapes, SSE framing, errors, readiness, metrics, disconnects."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest

from inference.config import BatchingConfig, LimitsConfig
from tests.inference.helpers import Gate, SlowSteps, make_engine, metric_value, started_engine, tiny_config, \
    wait_until

MODEL = "tiny-gpt2"


async def post(session: aiohttp.ClientSession, url: str, body: object, **kwargs: object) -> tuple[int, dict]:
    async with session.post(url, json=body, **kwargs) as resp:
        return resp.status, await resp.json()


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into event payloads, checking the exact ``data: ...\\n\\n`` framing."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block
        payloads.append(block[len("data: "):])
    assert payloads[-1] == "[DONE]"
    return payloads[:-1]


async def test_completion_shape_and_usage(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{served.url}/v1/completions",
                                  {"model": MODEL, "prompt": "Hello", "max_tokens": 7, "temperature": 0})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["total_tokens"] == 5 + body["usage"]["completion_tokens"]
    assert body["usage"]["completion_tokens"] == 7 or choice["finish_reason"] == "stop"


async def test_prompt_list_gives_one_choice_per_prompt(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        _, single_a = await post(s, f"{served.url}/v1/completions",
                                 {"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0})
        _, single_b = await post(s, f"{served.url}/v1/completions",
                                 {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 5, "temperature": 0})
        status, body = await post(s, f"{served.url}/v1/completions",
                                  {"model": MODEL, "prompt": ["abc", "wxyz"], "max_tokens": 5, "temperature": 0})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == single_a["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == 7
    assert single_b["usage"]["prompt_tokens"] == 4


async def test_streaming_framing_matches_plain_response(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    request = {"model": MODEL, "prompt": "Stream me", "max_tokens": 12, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        _, plain = await post(s, f"{served.url}/v1/completions", request)
        async with s.post(f"{served.url}/v1/completions",
                          json={**request, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.text()
    chunks = [json.loads(p) for p in sse_events(raw)]
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


async def test_chat_completion_and_chat_stream(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    request = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
               "max_tokens": 9, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{served.url}/v1/chat/completions", request)
        async with s.post(f"{served.url}/v1/chat/completions", json={**request, "stream": True}) as resp:
            raw = await resp.text()
    assert status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    template = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    specials = template.count("<|im_start|>") + template.count("<|im_end|>")  # one token each, bytes otherwise
    plain_bytes = len(template.replace("<|im_start|>", "").replace("<|im_end|>", "").encode())
    assert body["usage"]["prompt_tokens"] == plain_bytes + specials
    chunks = [json.loads(p) for p in sse_events(raw)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


async def test_models_health_and_metrics_endpoints(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.url}/v1/models") as resp:
            models = await resp.json()
        async with s.get(f"{served.url}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"{served.url}/readyz") as resp:
            assert resp.status == 200
        async with s.get(f"{served.url}/metrics") as resp:
            text = await resp.text()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert "kernelgate_inference_queue_depth" in text
    assert "kernelgate_inference_gpu_memory_bytes 0.0" in text


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": [1, 2, 999999]}, "prompt"),
])
async def test_invalid_fields_are_400_naming_the_param(serve, shared_engine, body: dict, param: str) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        status, err = await post(s, f"{served.url}/v1/completions", body)
    assert status == 400
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param


async def test_error_paths(serve, shared_engine) -> None:
    config = tiny_config(limits=LimitsConfig(max_body_bytes=2048))
    served = await serve(config, engine=shared_engine)
    url = f"{served.url}/v1/completions"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        status, err = await post(s, url, {"model": "gpt-4", "prompt": "x"})
        assert status == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model"
        status, err = await post(s, url, {"model": MODEL, "prompt": "x" * 500, "max_tokens": 100})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"
        assert err["error"]["param"] == "max_tokens" and "512" in err["error"]["message"]
        status, err = await post(s, url, {"model": MODEL, "prompt": [1] * 600})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"
        status, err = await post(s, f"{served.url}/v1/chat/completions",
                                 {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
        assert status == 400 and err["error"]["param"] == "messages[0].role"
        status, err = await post(s, url, {"model": MODEL, "prompt": "y" * 5000})
        assert status == 413 and err["error"]["code"] == "request_too_large"
        async with s.post(url, data=b"z" * 5000) as resp:  # chunked-size check by the reader
            assert resp.status == 413
        async with s.get(f"{served.url}/v1/nothing") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        status, err = await post(s, f"{served.url}/v1/embeddings", {"model": MODEL, "input": "x"})
        assert status == 400 and err["error"]["param"] == "model"


async def test_queue_full_is_429_with_retry_after_never_a_hang(serve) -> None:
    config = tiny_config(batching=BatchingConfig(max_batch_size=1, max_wait_ms=0.0, max_queue=1))
    engine = started_engine(config, observer=SlowSteps(0.02))
    try:
        served = await serve(config, engine=engine)
        url = f"{served.url}/v1/completions"
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "busy", "max_tokens": 40, "temperature": 0}
            first = asyncio.create_task(post(s, url, body))
            await wait_until(lambda: engine.stats().running == 1)
            second = asyncio.create_task(post(s, url, body))
            await wait_until(lambda: engine.stats().waiting == 1)
            async with asyncio.timeout(5):
                async with s.post(url, json=body) as resp:
                    assert resp.status == 429
                    assert resp.headers["Retry-After"] == "1"
                    err = await resp.json()
            assert err["error"]["code"] == "queue_full"
            assert (await first)[0] == 200 and (await second)[0] == 200
        assert metric_value(served, "kernelgate_inference_requests_total", route="/v1/completions",
                            status="429", tenant="none") == 1
    finally:
        engine.shutdown(10)


async def test_client_disconnect_mid_stream_frees_the_slot(serve) -> None:
    engine = started_engine(tiny_config(), observer=SlowSteps(0.01))
    try:
        served = await serve(engine=engine)
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{served.url}/v1/completions",
                                json={"model": MODEL, "prompt": "long story", "max_tokens": 400, "stream": True,
                                      "temperature": 0, "ignore_eos": True})
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            await resp.content.readuntil(b"\n\n")
            assert engine.stats().running == 1
            resp.close()  # drop the connection mid-stream
        await wait_until(lambda: engine.stats().running == 0, timeout=5)
        await wait_until(lambda: metric_value(engine.metrics.registry, "kernelgate_inference_finished_requests_total",
                                              reason="abort") == 1, timeout=5)
        assert metric_value(engine.metrics.registry, "kernelgate_inference_running_requests") == 0
        assert metric_value(engine.metrics.registry, "kernelgate_inference_generated_tokens_total") < 400
    finally:
        engine.shutdown(10)


async def test_readiness_before_and_after_warm_up(serve) -> None:
    gate = Gate()
    engine = make_engine(tiny_config(), load=gate)
    served = await serve(engine=engine)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{served.url}/readyz") as resp:
                assert resp.status == 503
            async with s.get(f"{served.url}/healthz") as resp:
                assert resp.status == 200
            status, err = await post(s, f"{served.url}/v1/completions", {"model": MODEL, "prompt": "x"})
            assert status == 503 and err["error"]["code"] == "not_ready"
            assert metric_value(served, "kernelgate_inference_ready") == 0
            gate.open()
            await wait_until(lambda: engine.ready, timeout=30)
            async with s.get(f"{served.url}/readyz") as resp:
                assert resp.status == 200
            status, _ = await post(s, f"{served.url}/v1/completions", {"model": MODEL, "prompt": "x"})
            assert status == 200
            assert metric_value(served, "kernelgate_inference_ready") == 1
    finally:
        gate.open()
        engine.shutdown(10)


async def test_metrics_move_as_requests_are_served(serve) -> None:
    engine = started_engine(tiny_config())
    try:
        served = await serve(engine=engine)
        before = {name: metric_value(served, name) for name in (
            "kernelgate_inference_generated_tokens_total", "kernelgate_inference_time_to_first_token_seconds_count",
            "kernelgate_inference_time_per_output_token_seconds_count")}
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(post(s, f"{served.url}/v1/completions",
                                                  {"model": MODEL, "prompt": f"req {i}", "max_tokens": 6},
                                                  headers={"x-kernelgate-tenant": "acme"}) for i in range(4)))
        assert all(status == 200 for status, _ in results)
        generated = sum(body["usage"]["completion_tokens"] for _, body in results)
        assert metric_value(served, "kernelgate_inference_generated_tokens_total") == \
            before["kernelgate_inference_generated_tokens_total"] + generated
        assert metric_value(served, "kernelgate_inference_time_to_first_token_seconds_count") == 4
        assert metric_value(served, "kernelgate_inference_time_per_output_token_seconds_count") >= 1
        assert metric_value(served, "kernelgate_inference_requests_total", route="/v1/completions", status="200",
                            tenant="acme") == 4
        assert metric_value(served, "kernelgate_inference_batch_size_count", phase="decode") > 0
        assert metric_value(served, "kernelgate_inference_batch_size_sum", phase="prefill") == 4
        assert metric_value(served, "kernelgate_inference_queue_depth") == 0
        assert metric_value(served, "kernelgate_inference_prompt_tokens_total") == sum(
            body["usage"]["prompt_tokens"] for _, body in results)
    finally:
        engine.shutdown(10)


async def test_request_timeout_is_504_and_frees_slot(serve) -> None:
    config = tiny_config(limits=replace(tiny_config().limits, request_timeout_s=0.2))
    engine = started_engine(config, observer=SlowSteps(0.02))
    try:
        served = await serve(config, engine=engine)
        async with aiohttp.ClientSession() as s:
            status, err = await post(s, f"{served.url}/v1/completions",
                                     # greedy and ignore_eos: no early stop can beat the timeout
                                     {"model": MODEL, "prompt": "slow", "max_tokens": 200, "temperature": 0,
                                      "ignore_eos": True})
        assert status == 504 and err["error"]["code"] == "request_timeout"
        await wait_until(lambda: engine.stats().running == 0, timeout=5)
    finally:
        engine.shutdown(10)
