"""Hostile input against the inference HTTP API: fuzzed bodies, headers and paths.

Never a 500 or a dropped connection; every error is OpenAI-shaped JSON.
"""

from __future__ import annotations

import json
import string

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25)

completion_like = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("tiny-gpt2"), st.text(max_size=20), st.integers()),
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=10), max_size=3),
                        st.lists(st.integers(min_value=-5, max_value=70000), max_size=5), json_values),
    "max_tokens": st.one_of(st.integers(min_value=-10, max_value=10**6), st.floats(), st.text(max_size=3),
                            st.none()),
    "temperature": st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
    "top_p": st.one_of(st.floats(allow_nan=True), st.integers()),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), st.integers()),
    "seed": st.one_of(st.integers(), st.floats(), st.text(max_size=3)),
    "stream": st.one_of(st.booleans(), st.text(max_size=3)),
    "n": st.integers(min_value=-2, max_value=5),
    "messages": json_values,
})

raw_bodies = st.one_of(
    completion_like.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=5000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}"),
    st.text(max_size=100).map(str.encode),
    st.just(b"\xff\xfe{\"prompt\": \"\xc3\x28\"}"),  # invalid UTF-8
)

header_values = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " äöü€", max_size=100)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
                              "/v1/../v1/completions", "/V1/COMPLETIONS", "/v1/completions/", "//v1//models"]),
       method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
       body=raw_bodies, header_value=header_values)
def test_fuzzed_requests_never_500(hostile_server, route, method, body, header_value):
    import asyncio

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, hostile_server + route, data=body,
                                       headers={"content-type": "application/json",
                                                "x-kernelgate-tenant": header_value.encode("utf-8").decode("latin-1"),
                                                "x-fuzz": header_value.encode("utf-8").decode("latin-1")},
                                       timeout=aiohttp.ClientTimeout(total=60)) as resp:
                text = await resp.text()
                return resp.status, resp.headers.get("content-type", ""), text

    status, content_type, text = asyncio.run(go())
    assert status < 500 or status == 503, (status, text[:300])
    if status >= 400 and status != 405 and "json" in content_type:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"]


def test_oversized_body_is_413(hostile_server):
    import asyncio

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(hostile_server + "/v1/completions", data=b"{" + b" " * (64 << 20) + b"}",
                                    headers={"content-type": "application/json"}) as resp:
                return resp.status, await resp.json()

    status, payload = asyncio.run(go())
    assert status == 413 and payload["error"]["message"]


def test_deeply_nested_json_is_400_not_500(hostile_server):
    import asyncio

    async def go(depth: int):
        async with aiohttp.ClientSession() as session:
            body = b'{"model": "tiny-gpt2", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
            async with session.post(hostile_server + "/v1/completions", data=body,
                                    headers={"content-type": "application/json"}) as resp:
                return resp.status, await resp.json()

    for depth in (900, 5000, 100000):
        status, payload = asyncio.run(go(depth))
        assert status == 400, (depth, payload)
        assert "JSON" in payload["error"]["message"] or "prompt" in payload["error"]["message"]
