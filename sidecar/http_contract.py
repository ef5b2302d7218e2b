"""The contract between Envoy's HTTP ext_authz client and ``sidecar/http_transport.py``.

In: nothing (constants). Out: the path prefix, the headers Envoy adds with its command
operators (``carried_headers``), which answer headers Envoy copies where, and the 5xx stand-in
statuses: one table for both ends. ``kernelgate/envoy_config.py`` writes Envoy's side from it,
the transport reads requests by it. It imports nothing, so the config loader (which the
inference server also runs) needs neither httptools nor the Envoy protos.
"""

from __future__ import annotations

# Envoy sends /<PATH_PREFIX><client path>; stripped here.
PATH_PREFIX = "/kernelgate-authz"
# Envoy's command operators -> headers on the authorization request -> CheckRequest attributes.
# A client's headers starting with CARRIED_PREFIX never reach the sidecar (the Envoy config's
# allowed_headers leaves them out), so only Envoy sets these: a client cannot forge them.
CARRIED_PREFIX = "x-kernelgate-authz-"
CARRIED = {
    "x-kernelgate-authz-source": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "x-kernelgate-authz-destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "x-kernelgate-authz-scheme": "%REQ(:SCHEME)%",
    "x-kernelgate-authz-protocol": "%PROTOCOL%",
}
# With TLS at Envoy: what gRPC's ``source.principal``/``destination.principal`` are made of (the
# first URI SAN, else the first DNS SAN, else the subject, as Envoy's ext_authz picks them).
CARRIED_TLS = {
    f"x-kernelgate-authz-{side}-{part}": f"%DOWNSTREAM_{peer}_{operator}%"
    for side, peer in (("source", "PEER"), ("destination", "LOCAL"))
    for part, operator in (("uri-san", "URI_SAN"), ("dns-san", "DNS_SAN"), ("subject", "SUBJECT"))
}
# With mutual TLS (ext_authz include_peer_certificate): the client's URL-encoded PEM, gRPC's
# ``source.certificate`` (identity.mtls reads it).
CARRIED_CERTIFICATE = {"x-kernelgate-authz-source-certificate": "%DOWNSTREAM_PEER_CERT%"}
CARRIED_NAMES = (*CARRIED, *CARRIED_TLS, *CARRIED_CERTIFICATE)


def carried_headers(tls: bool, peer_certificate: bool) -> dict[str, str]:
    """The headers Envoy's http_service adds: name -> command operator."""
    return {**CARRIED, **(CARRIED_TLS if tls else {}), **(CARRIED_CERTIFICATE if peer_certificate else {})}


# Which headers of an allowed answer Envoy copies where (ListStringMatcher prefixes in the Envoy
# config). Upstream: every "x-" header (ours are x-kernelgate-*); client: the RateLimit-* family.
UPSTREAM_HEADER_PREFIXES = ("x-",)
CLIENT_HEADER_PREFIXES = ("ratelimit-", "retry-after")
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
# Envoy treats any 5xx from the authorization service as a failed call (status_on_error, no body,
# no headers). So a deny that must reach the client as 5xx (503 fail closed + Retry-After, 500)
# travels as a 4xx stand-in, and the HTTP connection manager's local_reply_config maps it back
# (only for replies ext_authz made: response flag UAEX). One table for both ends.
STATUS_STAND_INS = {500: 470, 502: 472, 503: 473, 504: 474}
