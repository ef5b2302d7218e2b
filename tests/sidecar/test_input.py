"""CheckRequest -> OPA-Envoy input document."""

from __future__ import annotations

import json

from envoy.service.auth.v3 import external_auth_pb2

from sidecar.input import InputLimits, build_input, parse_path


def check_request(path="/v1/completions?stream=1&a=b", body="", headers=None, method="POST"):
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = method
    http.path = path
    http.host = "example.test"
    http.id = "123"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.size = len(body.encode())
    http.body = body
    for k, v in (headers or {"content-type": "application/json"}).items():
        http.headers[k] = v
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    req.attributes.source.address.socket_address.port_value = 5555
    req.attributes.context_extensions["route"] = "inference"
    return req


def test_document_has_opa_envoy_shape():
    doc = build_input(check_request(body=json.dumps({"model": "m", "prompt": "p"}))).document
    http = doc["attributes"]["request"]["http"]
    assert http["method"] == "POST" and http["path"] == "/v1/completions?stream=1&a=b"
    assert http["headers"]["content-type"] == "application/json"
    assert doc["parsed_path"] == ["v1", "completions"]
    assert doc["parsed_query"] == {"stream": ["1"], "a": ["b"]}
    assert doc["parsed_body"] == {"model": "m", "prompt": "p"}
    assert doc["truncated_body"] is False
    assert doc["version"] == {"encoding": "protojson", "ext_authz": "v3"}
    assert doc["attributes"]["source"]["address"]["socketAddress"] == {"address": "10.0.0.1", "portValue": 5555}
    assert doc["attributes"]["contextExtensions"] == {"route": "inference"}
    assert doc["kernelgate"]["body_error"] is None
    json.dumps(doc)  # must be JSON-able as is


def test_path_normalization_matches_what_upstream_routes_on():
    assert parse_path("/v1//completions/") == ["v1", "completions"]
    assert parse_path("/v1/./x/../completions") == ["v1", "completions"]
    assert parse_path("/%2e%2e/v1/completions") == ["v1", "completions"]
    assert parse_path("/v1/chat%2Fcompletions") == ["v1", "chat/completions"]
    assert parse_path("/../../etc/passwd") == ["etc", "passwd"]


def test_body_errors_are_named_not_raised():
    assert build_input(check_request(body='{"a": ')).document["kernelgate"]["body_error"] == "invalid_json"
    assert build_input(check_request(body="[1]")).document["kernelgate"]["body_error"] == "not_an_object"
    deep = "[" * 10000 + "]" * 10000
    assert build_input(check_request(body=deep)).document["kernelgate"]["body_error"] == "invalid_json"
    big = json.dumps({"prompt": "x" * 100})
    assert build_input(check_request(body=big), InputLimits(max_body_bytes=50)).document["kernelgate"][
        "body_error"] == "too_large"
    truncated = check_request(body='{"prompt": "x', headers={"content-type": "application/json",
                                                               "x-envoy-auth-partial-body": "true"})
    doc = build_input(truncated).document
    assert doc["truncated_body"] is True and doc["kernelgate"]["body_error"] == "too_large"
    assert "parsed_body" not in doc


def test_nan_and_infinity_are_not_json():
    for body in ('{"max_tokens": NaN}', '{"temperature": Infinity}', '{"x": -Infinity}', '{"x": 1e400}'):
        doc = build_input(check_request(body=body)).document
        assert doc["kernelgate"]["body_error"] == "invalid_json" and "parsed_body" not in doc


def test_non_json_bodies_are_passed_but_not_parsed():
    doc = build_input(check_request(body="hello", headers={"content-type": "text/plain"})).document
    assert doc["attributes"]["request"]["http"]["body"] == "hello"
    assert "parsed_body" not in doc and doc["kernelgate"]["body_error"] is None


def test_invalid_utf8_in_raw_body_does_not_crash():
    req = check_request()
    req.attributes.request.http.raw_body = b'{"prompt": "\xff\xfe"}'
    doc = build_input(req).document
    assert doc["parsed_body"]["prompt"] == "\ufffd\ufffd"
