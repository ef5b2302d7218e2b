"""Hostile input: fuzzed CheckRequests in-process, and path/header/body tricks through real Envoy.

Never a 500 or a crash, never a secret in a log line or a response, and the policy
decides on the same normalized path the upstream routes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import string
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelgate.config import load
from sidecar import http_contract, http_transport, server
from sidecar import response as sidecar_response
from tests.e2e.conftest import TRANSPORTS
from tests.e2e.test_authz_e2e import post
from tests.stack import ACME_KEY, AuthzStack

SECRET = ACME_KEY


@pytest.fixture(scope="module")
def opa_stack(tmp_path_factory):
    stack = AuthzStack(tmp_path_factory.mktemp("fuzz"))
    stack.start_opa()
    yield stack
    stack.stop()


header_names = st.text(alphabet=string.ascii_lowercase + "-_.:0123456789", min_size=1, max_size=40)
header_values = st.text(max_size=300)  # any unicode, incl. control characters and surrogates-free text
paths = st.one_of(
    st.text(max_size=200).map(lambda s: "/" + s),
    st.sampled_from(["/v1/completions", "/%2e%2e/v1/completions", "//v1//completions", "/v1/completions/.",
                     "/V1/Completions", "/v1/completions%00", "/v1/%2F/completions", "/" + "a/" * 500]),
)
bodies = st.one_of(
    st.just(""),
    st.text(max_size=500),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=30).map(json.dumps),
    st.integers(min_value=1, max_value=3000).map(lambda n: '{"model": "tiny-gpt2", "prompt": ' + "[" * n + "]" * n + "}"),
    st.fixed_dictionaries({"model": st.sampled_from(["tiny-gpt2", "nope", ""]),
                           "prompt": st.one_of(st.text(max_size=50), st.lists(st.integers(), max_size=5)),
                           "max_tokens": st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none())},
                          ).map(json.dumps),
)


def check_request(method: str, path: str, headers: dict[str, str], body: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.body = method, path, "localhost", body
    http.size = len(body.encode("utf-8", "replace"))
    for k, v in headers.items():
        http.headers[k] = v
    return req


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "get", "PoSt", ""]),
       path=paths, headers=st.dictionaries(header_names, header_values, max_size=8), body=bodies,
       credential=st.sampled_from(["none", "key", "bearer-garbage", "bearer-huge"]))
def test_fuzzed_checks_never_fail_with_500_or_leak(opa_stack: AuthzStack, method, path, headers, body, credential,
                                                    tmp_path_factory):
    headers = dict(headers)
    if credential == "key":
        headers["x-api-key"] = SECRET
    elif credential == "bearer-garbage":
        headers["authorization"] = "Bearer " + "x.y.z"
    elif credential == "bearer-huge":
        headers["authorization"] = "Bearer " + "a" * 20000 + ".b.c"
    grpc_request = check_request(method, path, headers, body)
    # The HTTP data path: the same request as Envoy's http_service sends it, through the adapter.
    http_request = http_transport.http_request(method, http_contract.PATH_PREFIX + path,
                                               {**headers, "host": "localhost"}, body.encode("utf-8", "replace"))
    answers = asyncio.run(_check_all([grpc_request, http_request], opa_stack))
    (answer, log_text), (http_answer, _) = answers
    response = sidecar_response.check_response(answer)  # what server.py sends back over gRPC
    assert _comparable(sidecar_response.check_response(http_answer)) == _comparable(response), \
        "the HTTP data path decided differently"
    http_transport.frame(http_answer)  # every answer can be framed as HTTP
    assert isinstance(response, external_auth_pb2.CheckResponse)
    if response.HasField("denied_response"):
        status = response.denied_response.status.code
        assert status in (400, 401, 403, 404, 405, 413, 429, 503), (status, response.denied_response.body)
        json.loads(response.denied_response.body)  # always a JSON body
        assert SECRET not in response.denied_response.body
    else:
        assert response.status.code == 0
    assert SECRET not in log_text


def _comparable(response: external_auth_pb2.CheckResponse) -> tuple:
    """Status, headers and body of an answer, less the per-check decision id."""
    def headers(options) -> dict:
        return {o.header.key: o.header.value for o in options if not o.header.key.endswith("decision-id")}
    if response.HasField("denied_response"):
        d = response.denied_response
        return ("deny", d.status.code, headers(d.headers), d.body)
    ok = response.ok_response
    return ("allow", headers(ok.headers), sorted(ok.headers_to_remove), headers(ok.response_headers_to_add))


async def _check_all(requests, stack: AuthzStack):
    import io

    config = load(stack.write_config()).authz
    config = dataclasses.replace(config, listen="127.0.0.1:0", metrics_listen="")
    sidecar = await server.start(config)
    log = io.StringIO()
    sidecar.authorizer._decision_log._stream = log  # capture the decision log of this in-process sidecar
    try:
        return [(await sidecar.authorizer.check(r), log.getvalue()) for r in requests]
    finally:
        await server.stop(sidecar, 0.1)


# --- through Envoy: the path the policy sees is the path the upstream gets ----------------
@pytest.fixture(scope="module", params=TRANSPORTS)
def envoy_stack(tmp_path_factory, request):
    stack = AuthzStack(tmp_path_factory.mktemp("hostile"), transport=request.param).start()
    yield stack
    stack.stop()


async def raw_request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


@pytest.mark.parametrize(("path", "expect_status", "upstream_path"), [
    ("/v1/./completions", 200, "/v1/completions"),
    ("/v1//completions", 200, "/v1/completions"),
    ("/v1/x/../completions", 200, "/v1/completions"),
    ("/%2e%2e/v1/completions", 200, "/v1/completions"),
    ("/v1/completions/..%2F..%2Fadmin", 400, None),   # encoded slashes: Envoy rejects
    ("/v1%2Fcompletions", 400, None),
    ("/V1/Completions", 404, None),                    # routes are case-sensitive, upstream's too
    ("/v1/completions.", 404, None),
    ("/v1/completions%20", 404, None),
])
async def test_path_tricks(envoy_stack: AuthzStack, path, expect_status, upstream_path):
    body = json.dumps({"model": "tiny-gpt2", "prompt": "x", "max_tokens": 4}).encode()
    raw = (f"POST {path} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {ACME_KEY}\r\ncontent-type: application/json\r\n"
           f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
    reply = await raw_request(envoy_stack.envoy_port, raw)
    status = int(reply.split(b" ", 2)[1])
    assert status == expect_status, reply[:300]
    if upstream_path:
        echo = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert echo["path"] == upstream_path
        assert envoy_stack.decisions()[-1]["path"] == upstream_path


async def test_hostile_headers_through_envoy(envoy_stack: AuthzStack):
    # duplicate credentials, non-ASCII values, a huge header
    cases = [
        ({"x-api-key": ACME_KEY, "authorization": "Bearer a.b.c"}, 401),
        ({"x-api-key": "ключ-🔑"}, 401),
        ({"x-api-key": "k" * 50000}, 401),
        ({"authorization": "Bearer " + "e" * 20000 + ".e.e"}, 401),
        ({"authorization": "Basic dXNlcjpwYXNz"}, 401),
    ]
    for headers, status in cases:
        got, _, payload = await post(envoy_stack.url, headers=headers)
        assert got in (status, 431), (headers.keys(), got, payload)
        if got == 401:
            assert payload["error"]["code"]
    # repeated header: Envoy joins duplicates with "," — never the key itself
    raw = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-api-key: {ACME_KEY}\r\nx-api-key: {ACME_KEY}\r\n"
           "content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").encode()
    reply = await raw_request(envoy_stack.envoy_port, raw)
    assert int(reply.split(b" ", 2)[1]) == 401


async def test_invalid_utf8_body_is_a_clean_400(envoy_stack: AuthzStack):
    status, _, payload = await post(envoy_stack.url, raw=b'{"model": "tiny-gpt2", "prompt": "\xff\xfe\xfd"}',
                                    headers={"x-api-key": ACME_KEY})
    # the body decodes with replacement characters and is valid JSON: the policy allows it, never a 500
    assert status in (200, 400), payload


def test_no_secret_in_any_log(envoy_stack: AuthzStack):
    for log_file in list(envoy_stack.logs.glob("*.log")) + [envoy_stack.decision_log]:
        text = Path(log_file).read_text(errors="replace")
        assert ACME_KEY not in text, log_file
