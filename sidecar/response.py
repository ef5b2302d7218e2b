"""Decision -> Answer (allow with headers for the upstream, or a denied HTTP response) -> CheckResponse."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# gRPC status that goes with each HTTP status; Envoy only uses the HTTP one,
# but logs and OPA-Envoy-aware tooling read this.
_GRPC_CODE = {
    401: code_pb2.UNAUTHENTICATED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> str:
    """An error in OpenAI's shape, so clients of the inference API parse it the same way."""
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


@dataclass(frozen=True)
class Answer:
    """What a check answers, whichever transport carries it: gRPC's CheckResponse is made from it
    by ``check_response`` (server.py), the HTTP transport frames it without any protobuf."""

    allowed: bool
    http_status: int  # 200 on allow
    headers: tuple[tuple[str, str], ...] = ()  # allow: for the upstream; deny: the client's response
    client_headers: tuple[tuple[str, str], ...] = ()  # allow: added to the client's response
    headers_to_remove: tuple[str, ...] = ()  # allow: dropped before the upstream
    body: str = ""  # deny
    dynamic_metadata: Mapping[str, Any] | None = None


def allow(upstream_headers: Mapping[str, str], remove_headers: Iterable[str],
          client_headers: Mapping[str, str], dynamic_metadata: Mapping[str, Any] | None = None) -> Answer:
    return Answer(True, 200, tuple(upstream_headers.items()), tuple(client_headers.items()), tuple(remove_headers),
                  dynamic_metadata=dynamic_metadata or None)


def deny(http_status: int, body: str, headers: Mapping[str, str],
         dynamic_metadata: Mapping[str, Any] | None = None) -> Answer:
    all_headers = dict(headers)
    if body and not any(k.lower() == "content-type" for k in all_headers):
        all_headers["content-type"] = "application/json"
    return Answer(False, http_status, tuple(all_headers.items()), body=body, dynamic_metadata=dynamic_metadata or None)


def _header_options(headers: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in headers
    ]


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(dict(value))
    return s


def check_response(answer: Answer) -> external_auth_pb2.CheckResponse:
    """Answer -> gRPC's CheckResponse."""
    if answer.allowed:
        ok = external_auth_pb2.OkHttpResponse(
            headers=_header_options(answer.headers),
            headers_to_remove=list(answer.headers_to_remove),
            response_headers_to_add=_header_options(answer.client_headers),
        )
        response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
    else:
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=answer.http_status),
            headers=_header_options(answer.headers),
            body=answer.body,
        )
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=_GRPC_CODE.get(answer.http_status, code_pb2.PERMISSION_DENIED)),
            denied_response=denied,
        )
    if answer.dynamic_metadata:
        response.dynamic_metadata.CopyFrom(_struct(answer.dynamic_metadata))
    return response
