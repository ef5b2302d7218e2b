"""Envoy's request -> the input document OPA-Envoy builds, so its policies run here unchanged.

In: a ``Request`` (what a check reads of Envoy's request, whichever transport carried it: gRPC's
CheckRequest through ``request_of``, HTTP's authorization request through
``http_transport.http_request``, no protobuf built or read back) or a CheckRequest.

Shape (protojson names, as opa-envoy-plugin's ``envoyauth/request.go``)::

    attributes.request.http.{id, method, headers, path, host, scheme, protocol, size, body}
    attributes.source / destination (socketAddress), contextExtensions, metadataContext
    parsed_path, parsed_query, parsed_body, truncated_body, version

``build_input`` gives the request's part; ``policy_document`` returns a new document that adds
``identity`` and ``kernelgate`` (``body_error`` and ``estimated_tokens``) once those are known,
so a policy can answer bad bodies with a clear 4xx instead of guessing why ``parsed_body`` is
missing. Neither changes a document it was given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from google.protobuf.json_format import MessageToDict

from common import strict_json

VERSION = {"encoding": "protojson", "ext_authz": "v3"}

# Envoy sets this header when with_request_body.allow_partial_message cut the body.
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"


@dataclass(frozen=True)
class InputLimits:
    """Guards against hostile bodies: parsing stops early instead of burning CPU."""

    max_body_bytes: int = 1 << 20
    max_json_depth: int = 64


@dataclass(frozen=True)
class Peer:
    """One side of the connection: ``address`` as protojson writes it (None: Envoy sent none)."""

    address: dict[str, Any] | None = None
    principal: str = ""
    certificate: str = ""


@dataclass(frozen=True)
class Request:
    """The fields of ``CheckRequest.attributes`` a check reads, as plain values."""

    method: str
    path: str  # with the query
    headers: dict[str, str]  # Envoy's header map: pseudo-headers, lower-case names
    id: str = ""
    host: str = ""
    scheme: str = ""
    protocol: str = ""
    size: int = 0
    body: str = ""
    source: Peer = Peer()
    destination: Peer = Peer()
    context_extensions: Mapping[str, str] | None = None
    metadata_context: dict[str, Any] | None = None


def request_of(check_request: Any) -> Request:
    """gRPC's CheckRequest -> Request."""
    attrs = check_request.attributes
    http = attrs.request.http
    body = http.body if http.body else (http.raw_body.decode("utf-8", "replace") if http.raw_body else "")
    return Request(
        method=http.method, path=http.path, headers=dict(http.headers), id=http.id, host=http.host,
        scheme=http.scheme, protocol=http.protocol, size=http.size, body=body,
        source=_peer(attrs.source), destination=_peer(attrs.destination),
        context_extensions=dict(attrs.context_extensions) if attrs.context_extensions else None,
        metadata_context=MessageToDict(attrs.metadata_context) if attrs.HasField("metadata_context") else None)


def _peer(peer: Any) -> Peer:
    return Peer(_socket_address(peer.address) if peer.HasField("address") else None, peer.principal,
                peer.certificate)


@dataclass(frozen=True)
class CheckInput:
    """The input document plus the few fields the server needs without digging."""

    document: dict[str, Any]
    method: str
    path: str
    route: str
    headers: dict[str, str]
    parsed_body: Any
    # What Envoy reports of the downstream TLS peer (mTLS): ``source.principal`` and, with
    # ext_authz ``include_peer_certificate``, the URL-encoded PEM ``source.certificate``.
    peer_principal: str = ""
    peer_certificate: str = ""


def build_input(request: Request | Any, limits: InputLimits = InputLimits()) -> CheckInput:
    """``request``: a Request, or gRPC's CheckRequest (read through ``request_of``)."""
    if not isinstance(request, Request):
        request = request_of(request)
    headers = request.headers
    raw_path = request.path
    path_only, _, query = raw_path.partition("?")
    parsed_path = parse_path(path_only)

    http_doc: dict[str, Any] = {
        "id": request.id,
        "method": request.method,
        "headers": headers,
        "path": raw_path,
        "host": request.host,
        "scheme": request.scheme,
        "protocol": request.protocol,
        "size": request.size,
    }
    body_text = request.body
    if body_text:
        http_doc["body"] = body_text

    document: dict[str, Any] = {
        "attributes": {"request": {"http": http_doc}},
        "parsed_path": parsed_path,
        "parsed_query": parse_query(query),
        "truncated_body": headers.get(PARTIAL_BODY_HEADER) == "true",
        "version": VERSION,
    }
    attributes = document["attributes"]
    for peer_name, peer in (("source", request.source), ("destination", request.destination)):
        if peer.address is not None:
            attributes[peer_name] = {"address": peer.address}
            if peer.principal:
                attributes[peer_name]["principal"] = peer.principal
    if request.context_extensions:
        attributes["contextExtensions"] = dict(request.context_extensions)
    if request.metadata_context is not None:
        attributes["metadataContext"] = request.metadata_context

    parsed_body, body_error = parse_body(body_text, headers, document["truncated_body"], limits)
    if parsed_body is not None:
        document["parsed_body"] = parsed_body
    document["kernelgate"] = {"body_error": body_error}
    return CheckInput(
        document=document,
        method=request.method,
        path=path_only,
        route="/" + "/".join(parsed_path),
        headers=headers,
        parsed_body=parsed_body,
        peer_principal=request.source.principal,
        peer_certificate=request.source.certificate,
    )


def policy_document(check_input: CheckInput, identity: Mapping[str, Any], estimated_tokens: int,
                    saturated_models: list[str] | None = None) -> dict[str, Any]:
    """The document OPA evaluates: the request's document plus who asks, what it may cost and which
    models no replica has room for (the policy may degrade those)."""
    base = check_input.document
    return {**base, "identity": identity, "kernelgate": {**base["kernelgate"], "estimated_tokens": estimated_tokens,
                                                         "saturated_models": saturated_models or []}}


def parse_path(path: str) -> list[str]:
    """Split and percent-decode; drop empty and '.' segments, resolve '..'.

    Envoy normalizes the path before ext_authz (``normalize_path``, ``merge_slashes``,
    escaped slashes rejected), so this matches what the upstream routes on; doing it
    again here keeps policies safe when the sidecar sits behind a laxer proxy.
    """
    segments: list[str] = []
    for raw in path.split("/"):
        seg = unquote(raw, errors="replace")
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    return segments


def parse_query(query: str) -> dict[str, list[str]]:
    if not query:
        return {}
    return parse_qs(query, keep_blank_values=True, errors="replace")


def parse_body(body: str, headers: dict[str, str], truncated: bool,
               limits: InputLimits) -> tuple[Any, str | None]:
    """JSON bodies become ``parsed_body``; anything wrong is named, never raised."""
    if not body:
        return None, None
    content_type = headers.get("content-type", "")
    looks_json = "json" in content_type or body.lstrip()[:1] in ("{", "[")
    if not looks_json:
        return None, None
    if truncated or len(body) > limits.max_body_bytes:
        return None, "too_large"
    if _nesting_depth_exceeds(body, limits.max_json_depth):
        return None, "invalid_json"
    try:
        value = strict_json.loads(body)
    except (ValueError, RecursionError):
        return None, "invalid_json"
    if not isinstance(value, dict):
        return value, "not_an_object"
    return value, None


def _nesting_depth_exceeds(body: str, max_depth: int) -> bool:
    """Cheap upper bound on bracket depth (brackets inside strings count too: stricter, never laxer)."""
    if body.count("{") + body.count("[") <= max_depth:
        return False
    depth = 0
    for ch in body:
        if ch in "{[":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "}]":
            depth -= 1
    return False


def _socket_address(address: Any) -> dict[str, Any]:
    if address.HasField("socket_address"):
        sa = address.socket_address
        return {"socketAddress": {"address": sa.address, "portValue": sa.port_value}}
    if address.HasField("pipe"):
        return {"pipe": {"path": address.pipe.path}}
    return {}
