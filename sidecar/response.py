"""Decision -> CheckResponse: OK with headers for the upstream, or a denied HTTP response."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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


def _header_options(headers: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in headers.items()
    ]


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(dict(value))
    return s


def allow(upstream_headers: Mapping[str, str], remove_headers: Iterable[str],
          client_headers: Mapping[str, str], dynamic_metadata: Mapping[str, Any] | None = None,
          ) -> external_auth_pb2.CheckResponse:
    ok = external_auth_pb2.OkHttpResponse(
        headers=_header_options(upstream_headers),
        headers_to_remove=list(remove_headers),
        response_headers_to_add=_header_options(client_headers),
    )
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
    if dynamic_metadata:
        response.dynamic_metadata.CopyFrom(_struct(dynamic_metadata))
    return response


def deny(http_status: int, body: str, headers: Mapping[str, str],
         dynamic_metadata: Mapping[str, Any] | None = None) -> external_auth_pb2.CheckResponse:
    all_headers = dict(headers)
    if body and not any(k.lower() == "content-type" for k in all_headers):
        all_headers["content-type"] = "application/json"
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=http_status),
        headers=_header_options(all_headers),
        body=body,
    )
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(http_status, code_pb2.PERMISSION_DENIED)),
        denied_response=denied,
    )
    if dynamic_metadata:
        response.dynamic_metadata.CopyFrom(_struct(dynamic_metadata))
    return response
