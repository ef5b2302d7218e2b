"""Envoy's HTTP ext_authz (``http_service``) in front of the same Authorizer as gRPC Check.

In: Envoy's authorization request over HTTP/1.1 (the client's method, ``PATH_PREFIX`` + path,
all the client's headers, the buffered body) plus the attributes only gRPC carries (peer
addresses, scheme, protocol; with TLS the peers' principals, with mutual TLS the client's
certificate), which Envoy adds as ``CARRIED*`` headers with its command operators
(``kernelgate/envoy_config.py`` writes both from ``sidecar/http_contract.py``).
Out: 200 with the headers for the upstream, the client and ``x-envoy-auth-headers-to-remove``,
or the deny's status, headers and body.

This module only translates: the request becomes the ``input.Request`` gRPC's CheckRequest would
have given (built directly: no protobuf made and read back), ``Authorizer.check`` decides exactly
as for gRPC, and its ``response.Answer`` is framed as HTTP (no CheckResponse built either).
Why it exists: a grpc.aio call costs ~0.5 ms of CPU on its own; an asyncio protocol with
httptools' C parser costs a fraction.

What HTTP mode cannot carry (Envoy's HTTP client, not ours): ``dynamic_metadata`` (dropped),
context extensions and metadata context; upstream headers must start with ``x-`` and client
headers on allow with ``ratelimit-``/``retry-after`` (``UPSTREAM_HEADER_PREFIXES``,
``CLIENT_HEADER_PREFIXES``). 5xx denials go through ``STATUS_STAND_INS``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httptools
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.http_contract import (
    CARRIED, CARRIED_NAMES, CLIENT_HEADER_PREFIXES, HEADERS_TO_REMOVE, PATH_PREFIX, STATUS_STAND_INS,
    UPSTREAM_HEADER_PREFIXES,
)
from sidecar.input import Peer, Request
from sidecar.response import Answer

log = logging.getLogger("kernelgate.authz.http")


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}

Check = Callable[[Any, Mapping[str, str] | None], Awaitable[Any]]


def _given(value: str) -> str:
    """A command operator's value; Envoy writes "-" (or nothing) for one it has no value for."""
    return "" if value == "-" else value


# per side: the address header, then the principal's headers in the order Envoy picks them
_SIDES = tuple((f"x-kernelgate-authz-{side}",
                (f"x-kernelgate-authz-{side}-uri-san", f"x-kernelgate-authz-{side}-dns-san"),
                f"x-kernelgate-authz-{side}-subject") for side in ("source", "destination"))
_CERTIFICATE = "x-kernelgate-authz-source-certificate"
_PLAIN = frozenset(CARRIED)  # without TLS Envoy carries only these: no principal, no certificate


def _principal(carried: dict[str, str], sans_names: tuple[str, ...], subject_name: str) -> str:
    for name in sans_names:
        sans = _given(carried.get(name, ""))
        if sans:
            return sans.split(",", 1)[0]
    return _given(carried.get(subject_name, ""))


def http_request(method: str, target: str, headers: dict[str, str], body: bytes) -> Request:
    """What gRPC's CheckRequest would have carried for this authorization request (``headers`` is
    taken over: the carried and Host headers are moved out of it)."""
    carried = {name: headers.pop(name) for name in CARRIED_NAMES if name in headers}
    path = target[len(PATH_PREFIX):] if target.startswith(PATH_PREFIX) else target
    host = headers.pop("host", "")
    scheme = _given(carried.get("x-kernelgate-authz-scheme", "")) or "http"
    length = headers.get("content-length", "")
    tls = not carried.keys() <= _PLAIN
    peers = []
    for address_name, sans_names, subject_name in _SIDES:
        host_part, _, port = _given(carried.get(address_name, "")).rpartition(":")
        address = {"socketAddress": {"address": host_part.strip("[]"), "portValue": int(port)}} \
            if host_part and port.isdigit() else None
        certificate = _given(carried.get(_CERTIFICATE, "")) if tls and not peers else ""
        peers.append(Peer(address, _principal(carried, sans_names, subject_name) if tls else "", certificate))
    return Request(
        method=method, path=path, id=headers.get("x-request-id", ""), host=host, scheme=scheme,
        protocol=_given(carried.get("x-kernelgate-authz-protocol", "")),
        # Envoy's header map as gRPC sends it: pseudo-headers first, no Host (it is :authority).
        headers={":authority": host, ":path": path, ":method": method, ":scheme": scheme, **headers},
        size=len(body) if body else (int(length) if length.isdigit() else 0),
        body=body.decode("utf-8", "replace") if body else "", source=peers[0], destination=peers[1])


def check_request(method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
    """The CheckRequest Envoy's gRPC client would have sent (``http_request`` as protobuf: for
    comparing the two transports; the HTTP path itself never builds it)."""
    request = http_request(method, target, headers, body)
    check = external_auth_pb2.CheckRequest()
    attrs = check.attributes
    http = attrs.request.http
    http.id, http.method, http.path, http.host = request.id, request.method, request.path, request.host
    http.scheme, http.protocol, http.size = request.scheme, request.protocol, request.size
    http.headers.update(request.headers)
    if body:
        http.raw_body = body
    for peer, side in ((attrs.source, request.source), (attrs.destination, request.destination)):
        if side.address is not None:
            socket = side.address["socketAddress"]
            peer.address.socket_address.address = socket["address"]
            peer.address.socket_address.port_value = socket["portValue"]
        if side.principal:
            peer.principal = side.principal
        if side.certificate:
            peer.certificate = side.certificate
    return check


def _routed(headers: tuple[tuple[str, str], ...], prefixes: tuple[str, ...], other: tuple[str, ...],
            where: str) -> list[str]:
    """Header lines of an allow; Envoy copies a name to ``where`` only when it has one of ``prefixes``
    (and to the other side too when it has one of ``other``): a name it would misroute is logged."""
    lines = []
    for key, value in headers:
        key = key.lower()
        if not key.startswith(prefixes) or key.startswith(other):
            log.warning("HTTP ext_authz cannot route %s header %r (names starting %s pass)", where, key, prefixes)
        lines.append(f"{key}: {value}")
    return lines


def frame(answer: Answer, keep_alive: bool = True) -> bytes:
    """The check's Answer -> the HTTP/1.1 answer Envoy's http_service client reads back."""
    lines: list[str]
    body = b""
    if not answer.allowed:
        status = answer.http_status or 403
        status = STATUS_STAND_INS.get(status, status)
        body = answer.body.encode()
        lines = [f"{key}: {value}" for key, value in answer.headers if key.lower() != "content-length"]
    else:
        status = 200
        lines = [*_routed(answer.headers, UPSTREAM_HEADER_PREFIXES, CLIENT_HEADER_PREFIXES, "upstream"),
                 *_routed(answer.client_headers, CLIENT_HEADER_PREFIXES, UPSTREAM_HEADER_PREFIXES, "client")]
        if answer.headers_to_remove:
            lines.append(f"{HEADERS_TO_REMOVE}: {','.join(answer.headers_to_remove)}")
    if not keep_alive:
        lines.append("connection: close")
    head = "\r\n".join([f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", *lines,
                        f"content-length: {len(body)}", "", ""])
    return head.encode("latin-1", "replace") + body


class _Protocol(asyncio.Protocol):
    """One connection from Envoy: parse requests, check each, answer in order."""

    def __init__(self, check: Check, in_flight: set[asyncio.Future], draining: asyncio.Event) -> None:
        self._check = check
        self._in_flight = in_flight  # the server's: drain() waits for it to empty
        self._draining = draining
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # connection_made's
        self._previous: asyncio.Task | None = None  # the answer before this one (pipelining)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._transport = transport
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.warning("malformed authorization request from Envoy: %s", exc)
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        request = http_request(method, self._url.decode("utf-8", "replace"), self._headers, b"".join(self._body))
        # While draining, each answer closes its connection so Envoy opens a new one (elsewhere).
        keep_alive = self._parser.should_keep_alive() and not self._draining.is_set()
        # the answer's task is what is in flight (drain waits for it) and what the next answer on
        # this connection waits for before writing
        task = (self._loop or asyncio.get_running_loop()).create_task(
            self._answer(request, keep_alive, self._previous))
        self._previous = task
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _answer(self, request: Request, keep_alive: bool, previous: asyncio.Task | None) -> None:
        headers = request.headers
        metadata = {"traceparent": headers["traceparent"], "tracestate": headers.get("tracestate", "")} \
            if "traceparent" in headers else None
        try:
            payload = frame(await self._check(request, metadata), keep_alive)
        except Exception:  # noqa: BLE001 - the check answers its own failures; this is a bug here
            log.exception("authorization request not answered")
            payload, keep_alive = b"", False  # Envoy sees the connection close: its status_on_error
        if previous is not None and not previous.done():
            await asyncio.wait((previous,))  # its outcome is its own: only its order matters here
        if self._transport is not None:
            if payload:
                self._transport.write(payload)
            if not keep_alive:
                self._transport.close()


class HttpAuthzServer:
    """The listener and what it has in flight; ``drain`` stops it without dropping a check."""

    def __init__(self, check: Check) -> None:
        self._check = check
        self._in_flight: set[asyncio.Future] = set()
        self._draining = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(self._check, self._in_flight, self._draining),
                                                host, port, reuse_port=reuse_port or None, backlog=1024)
        return self._server.sockets[0].getsockname()[1]

    async def drain(self, grace_s: float) -> None:
        """No new connections; answers close theirs; waits (up to grace_s) for checks in flight."""
        self._draining.set()
        if self._server is not None:
            self._server.close()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)


async def serve(check: Check, host: str, port: int, reuse_port: bool = False) -> HttpAuthzServer:
    """Listen for Envoy's HTTP authorization requests; each is answered by ``check``."""
    server = HttpAuthzServer(check)
    await server.start(host, port, reuse_port)
    return server
