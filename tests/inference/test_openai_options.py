"""The #20 options over HTTP: response shapes (completions and chat, streamed and not) and 400s."""

from __future__ import annotations

import json

import aiohttp
import jsonschema
import pytest

from tests.inference.test_api import MODEL, post, sse_events
from tests.inference.test_sampling_options import SCHEMA

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


async def stream(session: aiohttp.ClientSession, url: str, body: dict) -> list[dict]:
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        return [json.loads(p) for p in sse_events(await resp.text())]


async def test_completion_logprobs_and_echo(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    url = f"{served.url}/v1/completions"
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, url, {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                           "logprobs": 3, "ignore_eos": True})
        assert status == 200
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert all(len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the best
                   for top, value in zip(lp["top_logprobs"], lp["token_logprobs"]))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

        status, echoed = await post(s, url, {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                             "logprobs": 3, "echo": True, "ignore_eos": True})
        choice = echoed["choices"][0]
        assert choice["text"] == "Hello" + body["choices"][0]["text"]
        elp = choice["logprobs"]
        assert elp["tokens"][:5] == list("Hello") and elp["token_logprobs"][0] is None
        assert elp["top_logprobs"][0] is None and elp["token_logprobs"][5:] == lp["token_logprobs"]
        assert echoed["usage"] == body["usage"]

        chunks = await stream(s, url, {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                       "logprobs": 3, "echo": True, "ignore_eos": True})
    pieces = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in pieces) == choice["text"]
    assert sum((p["logprobs"]["token_logprobs"] for p in pieces if p["logprobs"]), []) == elp["token_logprobs"]


async def test_chat_logprobs_streamed_and_not(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    url = f"{served.url}/v1/chat/completions"
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
               "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, url, request)
        chunks = await stream(s, url, request)
    assert status == 200
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks
                    if c["choices"] and c["choices"][0].get("logprobs")), [])
    assert streamed == content


async def test_n_choices_and_usage(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{served.url}/v1/completions",
                                  {"model": MODEL, "prompt": ["ab", "xyz"], "max_tokens": 4, "n": 3,
                                   "temperature": 1.0, "seed": 4, "ignore_eos": True})
        chunks = await stream(s, f"{served.url}/v1/chat/completions",
                              {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                               "n": 2, "temperature": 0.5, "stream_options": {"include_usage": True},
                               "ignore_eos": True})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 24
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and len(chunks[0]["choices"]) == 2
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_penalties_and_logit_bias_over_http(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{served.url}/v1/completions",
                                  {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0.7,
                                   "presence_penalty": 1.2, "frequency_penalty": 0.4,
                                   "logit_bias": {"65": 100}, "ignore_eos": True})
    assert status == 200 and body["choices"][0]["text"] == "AAAAAA"


async def test_json_schema_and_json_object_in_chat(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    url = f"{served.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "a person"}]
    async with aiohttp.ClientSession() as s:
        for seed in range(3):
            status, body = await post(s, url, {"model": MODEL, "messages": messages, "max_tokens": 200, "seed": seed,
                                               "response_format": SCHEMA_FORMAT})
            assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
            jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
        chunks = await stream(s, url, {"model": MODEL, "messages": messages, "max_tokens": 200, "seed": 9,
                                       "response_format": SCHEMA_FORMAT})
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        jsonschema.validate(json.loads(text), SCHEMA)
        # Strings of a random-weight model run long: favour the closing quote and brace, as a real model would.
        status, body = await post(s, url, {"model": MODEL, "messages": messages, "max_tokens": 300, "seed": 1,
                                           "response_format": {"type": "json_object"},
                                           "logit_bias": {str(ord('"')): 4, str(ord("}")): 4}})
        assert status == 200 and isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.mark.parametrize(("route", "extra", "param"), [
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"echo": "yes"}, "echo"),
    ("completions", {"n": 129}, "n"),
    ("completions", {"n": "2"}, "n"),
    ("completions", {"n": 9}, "n"),  # more than the batch (8): the sequences could never run together
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": "x"}, "frequency_penalty"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"1": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("completions", {"logit_bias": [1, 2]}, "logit_bias"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}},
     "response_format.json_schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"echo": True}, "echo"),
])
async def test_invalid_options_are_400_naming_the_parameter(serve, shared_engine, route: str, extra: dict,
                                                            param: str) -> None:
    served = await serve(engine=shared_engine)
    path, base = ("/v1/completions", COMPLETION) if route == "completions" else ("/v1/chat/completions", CHAT)
    async with aiohttp.ClientSession() as s:
        status, err = await post(s, served.url + path, {**base, **extra})
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
