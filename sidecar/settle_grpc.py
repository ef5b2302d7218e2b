"""The settlement channel: gRPC ``kernelgate.settlement.v1.Settlement/Settle`` on the sidecar's
own listener, where the inference server reports what a decision really used.

In: a ``google.protobuf.Struct`` ``{decision_id, prompt_tokens, completion_tokens, ending}``.
Out: a Struct ``{settled, charged, refunded, reserved}``; a malformed report is INVALID_ARGUMENT
naming the field; UNAVAILABLE when Redis does not answer (the reporter retries). A well-known
message type, so neither side needs generated code.

Why here: the same port Envoy already reaches (no new listener, SO_REUSEPORT workers included),
and one settlement path for the memory and Redis backends, with budget keys and Redis
credentials kept out of the inference server.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format, struct_pb2

from sidecar.ratelimit import BackendUnavailable
from sidecar.settlement import ReportError, Settlement, UsageReport

SERVICE = "kernelgate.settlement.v1.Settlement"
METHOD = f"/{SERVICE}/Settle"


def handler(settlement: Settlement) -> grpc.GenericRpcHandler:
    async def settle(request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        try:
            report = UsageReport.parse(json_format.MessageToDict(request))
        except ReportError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            settled = await settlement.settle(report)
        except BackendUnavailable as exc:  # Redis did not answer: the reporter retries
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate-limit backend unavailable: {exc}")
        reply = struct_pb2.Struct()
        reply.update(settled.to_json())
        return reply

    return grpc.method_handlers_generic_handler(SERVICE, {"Settle": grpc.unary_unary_rpc_method_handler(
        settle, request_deserializer=struct_pb2.Struct.FromString,
        response_serializer=struct_pb2.Struct.SerializeToString)})
