"""A Check server that allows everything and does nothing else: the floor of any grpc.aio sidecar.

Same grpcio, same uvloop, same xds-protos messages as ``kernelgate authz``, but no
identity, policy, rate limit, metrics or logging. ``bench/gateway.py`` puts it behind
Envoy like the real sidecar, so the difference between the two is what kernelgate's own
work costs, and the difference between it and Envoy alone is what the gRPC hop costs.

    python bench/noop_authz.py 127.0.0.1:9191
"""

from __future__ import annotations

import sys

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

ALLOW = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                        ok_response=external_auth_pb2.OkHttpResponse())


class AllowEverything(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        return ALLOW


async def serve(address: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowEverything(), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
