"""The settlement channel on the sidecar's gRPC port: a report settles the reservation its check
made, once; a repeat is a no-op; a malformed report is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import json_format, struct_pb2

from sidecar.settle_grpc import METHOD
from tests.stack import AuthzStack
from tests.sidecar.test_sidecar_grpc import completion_check, sidecar  # noqa: F401 - fixture


def struct(**fields) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(fields)
    return message


async def test_report_settles_its_reservation_once(sidecar: AuthzStack) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.authz_port}") as channel:
        check = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(completion_check())
        headers = {h.header.key: h.header.value for h in check.ok_response.headers}
        decision_id = headers["x-kernelgate-decision-id"]
        reserved = sidecar.decisions()[-1]["rate_limit"]["reserved"]
        assert reserved == 1 + 4  # "hi" at 4 chars a token (no counter here) + max_tokens 4
        settle = channel.unary_unary(METHOD, request_serializer=struct_pb2.Struct.SerializeToString,
                                     response_deserializer=struct_pb2.Struct.FromString)
        first = json_format.MessageToDict(await settle(struct(decision_id=decision_id, prompt_tokens=2,
                                                              completion_tokens=1, ending="stop")))
        assert first == {"settled": True, "charged": 3.0, "refunded": 2.0, "reserved": 5.0}
        again = json_format.MessageToDict(await settle(struct(decision_id=decision_id, prompt_tokens=2,
                                                              completion_tokens=1)))
        assert again["settled"] is False
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await settle(struct(decision_id=decision_id, prompt_tokens=-1, completion_tokens=1))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_tokens" in bad.value.details()
    [line] = sidecar.settlements()
    assert (line["decision_id"], line["charged"], line["refunded"], line["tenant"]) == (decision_id, 3, 2, "acme")
