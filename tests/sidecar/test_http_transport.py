"""The HTTP ext_authz adapter: Envoy's authorization request -> CheckRequest, CheckResponse -> HTTP."""

from __future__ import annotations

import asyncio

from sidecar import http_contract, http_transport, response


def test_request_becomes_the_check_request_envoy_would_send_over_grpc() -> None:
    headers = {"host": "api.local", "x-api-key": "k", "x-request-id": "r1", "content-length": "2",
               "x-kernelgate-authz-source": "10.0.0.7:4242", "x-kernelgate-authz-destination": "[::1]:8080",
               "x-kernelgate-authz-source-uri-san": "spiffe://a/b,spiffe://a/c", "x-kernelgate-authz-source-dns-san": "a",
               "x-kernelgate-authz-destination-uri-san": "-", "x-kernelgate-authz-destination-dns-san": "-",
               "x-kernelgate-authz-destination-subject": "CN=envoy,O=kg",
               "x-kernelgate-authz-source-certificate": "-----BEGIN%20CERTIFICATE-----%0A",
               "x-kernelgate-authz-scheme": "https", "x-kernelgate-authz-protocol": "HTTP/2"}
    req = http_transport.check_request("POST", http_contract.PATH_PREFIX + "/v1/completions?x=1", headers, b"{}")
    attrs = req.attributes
    http = attrs.request.http
    assert (http.method, http.path, http.host, http.scheme, http.protocol, http.id) == (
        "POST", "/v1/completions?x=1", "api.local", "https", "HTTP/2", "r1")
    assert http.raw_body == b"{}" and http.size == 2
    assert dict(http.headers) == {":authority": "api.local", ":path": "/v1/completions?x=1", ":method": "POST",
                                  ":scheme": "https", "x-api-key": "k", "x-request-id": "r1", "content-length": "2"}
    assert (attrs.source.address.socket_address.address, attrs.source.address.socket_address.port_value) == (
        "10.0.0.7", 4242)
    # principals as Envoy's gRPC client picks them: first URI SAN, else first DNS SAN, else subject
    assert attrs.source.principal == "spiffe://a/b" and attrs.destination.principal == "CN=envoy,O=kg"
    assert attrs.source.certificate == "-----BEGIN%20CERTIFICATE-----%0A" and attrs.destination.certificate == ""
    assert attrs.destination.address.socket_address.address == "::1"


def test_the_http_paths_request_is_what_the_grpc_check_request_reads_as() -> None:
    """The HTTP transport builds the check's Request directly; gRPC's CheckRequest for the same
    authorization request, read through input.request_of, gives the same Request and document."""
    from sidecar.input import build_input, request_of

    cases = [
        ({"host": "h", "x-user": "u", "content-type": "application/json", "x-request-id": "r",
          "x-kernelgate-authz-source": "127.0.0.1:40000", "x-kernelgate-authz-destination": "127.0.0.1:10000",
          "x-kernelgate-authz-scheme": "http", "x-kernelgate-authz-protocol": "HTTP/1.1"}, b'{"model": "m"}'),
        ({"host": "h", "content-length": "12", "x-kernelgate-authz-source": "-",
          "x-kernelgate-authz-source-subject": "CN=c", "x-kernelgate-authz-source-certificate": "PEM%0A",
          "x-kernelgate-authz-destination": "[::1]:443", "x-kernelgate-authz-destination-dns-san": "d,e"}, b""),
        ({}, b"\xff\xfe not utf-8"),
    ]
    for headers, body in cases:
        for target in (http_contract.PATH_PREFIX + "/v1/chat/completions?a=1&a=2", "/v1/../v1/models"):
            direct = http_transport.http_request("POST", target, dict(headers), body)
            via_grpc = request_of(http_transport.check_request("POST", target, dict(headers), body))
            assert direct == via_grpc
            assert build_input(direct).document == build_input(via_grpc).document


def test_allow_and_deny_are_framed_for_envoys_http_client() -> None:
    allowed = http_transport.frame(response.allow({"x-kernelgate-tenant": "acme"}, ["x-api-key", "authorization"],
                                                  {"ratelimit-remaining": "4"}))
    assert allowed.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nx-kernelgate-tenant: acme\r\n" in allowed and b"\r\nratelimit-remaining: 4\r\n" in allowed
    assert b"\r\nx-envoy-auth-headers-to-remove: x-api-key,authorization\r\n" in allowed
    assert allowed.endswith(b"content-length: 0\r\n\r\n")
    denied = http_transport.frame(response.deny(401, '{"error": 1}', {"www-authenticate": "Bearer"}), keep_alive=False)
    head, body = denied.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 401 ") and b"www-authenticate: Bearer" in head and b"connection: close" in head
    assert body == b'{"error": 1}' and f"content-length: {len(body)}".encode() in head
    # a 5xx deny travels as its stand-in (Envoy would drop a 5xx's body and headers)
    unavailable = http_transport.frame(response.deny(503, "{}", {"retry-after": "1"}))
    assert unavailable.startswith(f"HTTP/1.1 {http_contract.STATUS_STAND_INS[503]} ".encode())


async def test_pipelined_requests_are_answered_in_order_and_garbage_gets_a_400() -> None:
    async def check(request, metadata):  # the slower first answer must still come first
        path = request.path
        await asyncio.sleep(0.05 if path == "/slow" else 0)
        return response.allow({"x-path": path}, [], {})

    server = http_transport.HttpAuthzServer(check)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /kernelgate-authz/slow HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"GET /kernelgate-authz/fast HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            data += await asyncio.wait_for(reader.read(4096), 5)
        assert data.index(b"x-path: /slow") < data.index(b"x-path: /fast")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x01 not http\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(4096), 5)).startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await server.drain(1.0)


async def test_drain_lets_a_check_in_flight_finish_and_closes_its_connection() -> None:
    started = asyncio.Event()

    async def check(request, metadata):
        started.set()
        await asyncio.sleep(0.3)
        return response.allow({}, [], {})

    server = http_transport.HttpAuthzServer(check)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /kernelgate-authz/x HTTP/1.1\r\nhost: x\r\n\r\n")
    await started.wait()
    await server.drain(5.0)  # returns once the answer is written
    answer = await asyncio.wait_for(reader.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()
    try:
        await asyncio.open_connection("127.0.0.1", port)
        refused = False
    except OSError:
        refused = True
    assert refused, "a draining server accepts no new connection"


def test_one_answer_makes_the_grpc_check_response_and_the_http_frame() -> None:
    """Both transports carry the same Answer: the CheckResponse's fields are what frame() writes."""
    from google.rpc import code_pb2

    allowed = response.allow({"x-kernelgate-tenant": "acme"}, ["x-api-key"], {"ratelimit-remaining": "4"},
                             {"tenant": "acme"})
    ok = response.check_response(allowed)
    assert ok.status.code == code_pb2.OK and ok.dynamic_metadata["tenant"] == "acme"
    assert [(h.header.key, h.header.value) for h in ok.ok_response.headers] == [("x-kernelgate-tenant", "acme")]
    assert [(h.header.key, h.header.value) for h in ok.ok_response.response_headers_to_add] == [
        ("ratelimit-remaining", "4")]
    assert list(ok.ok_response.headers_to_remove) == ["x-api-key"]
    denied = response.deny(503, '{"e": 1}', {"retry-after": "1"})
    no = response.check_response(denied)
    assert no.status.code == code_pb2.UNAVAILABLE and no.denied_response.status.code == 503
    assert {h.header.key: h.header.value for h in no.denied_response.headers} == {
        "retry-after": "1", "content-type": "application/json"}
    assert no.denied_response.body == '{"e": 1}'
    framed = http_transport.frame(denied)
    assert b"\r\nretry-after: 1\r\n" in framed and b"\r\ncontent-type: application/json\r\n" in framed
    assert framed.endswith(b'{"e": 1}')
