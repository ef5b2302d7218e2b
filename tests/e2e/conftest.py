"""Every end-to-end suite runs over both of Envoy's ext_authz data paths: gRPC Check and HTTP."""

from __future__ import annotations

import pytest

TRANSPORTS = ("grpc", "http")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """How Envoy asks the sidecar (tests.stack.AuthzStack.transport)."""
    return request.param
