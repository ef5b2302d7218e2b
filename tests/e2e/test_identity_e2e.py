"""Identity through the whole stack (Envoy -> sidecar -> OPA -> upstream): client certificates
over mutual TLS, and tokens from a real identity provider (Ory Hydra) that then goes down."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import Issued, issue, make_ca
from tests.hydra import Hydra, start_hydra
from tests.stack import AuthzStack

COMPLETION = {"model": "tiny-gpt2", "prompt": "Hello there", "max_tokens": 8}
AUDIENCE = "kernelgate"
SPIFFE_ACME = "spiffe://cluster.local/ns/acme/sa/batch"


async def post(url: str, headers: dict[str, str] | None = None,
               ssl_context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", data=json.dumps(COMPLETION), ssl=ssl_context,
                                headers={"content-type": "application/json", **(headers or {})}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else {}


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[list[AuthzStack]]:
    made: list[AuthzStack] = []
    yield made
    for stack in made:
        stack.stop()


# --- mutual TLS ---------------------------------------------------------------------------------


def client_context(ca: Issued, client: Issued | None, directory: Path) -> ssl.SSLContext:
    ca_file = directory / "ca-for-client.crt"
    ca_file.write_bytes(ca.cert_pem)
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        cert, key = client.write(directory, f"client-{client.cert.serial_number}")
        context.load_cert_chain(str(cert), str(key))
    return context


async def test_client_certificate_identity_through_envoy(tmp_path: Path, stacks: list[AuthzStack],
                                                         transport: str) -> None:
    ca = make_ca()
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert_pem)
    server_cert, server_key = issue(ca, "envoy", server=True).write(certs, "envoy")
    workdir = tmp_path / "stack"
    workdir.mkdir()
    stack = AuthzStack(workdir, transport=transport, envoy_overrides={
        "tls_cert_file": str(server_cert), "tls_key_file": str(server_key), "tls_client_ca_file": str(certs / "ca.crt")},
        authz_overrides={"identity": {"mtls": {"enabled": True, "identities": {
            SPIFFE_ACME: {"tenant": "acme", "tier": "pro", "scopes": ["*"], "name": "acme-batch"}}}}})
    stacks.append(stack)
    stack.start()
    url = f"https://127.0.0.1:{stack.envoy_port}"

    acme = issue(ca, "acme batch", uris=(SPIFFE_ACME,))
    status, echo = await post(url, ssl_context=client_context(ca, acme, certs))
    assert status == 200, echo
    assert echo["headers"]["x-kernelgate-tenant"] == "acme"
    assert echo["headers"]["x-kernelgate-subject"] == SPIFFE_ACME
    record = stack.decisions()[-1]
    assert (record["identity_method"], record["identity_issuer"], record["tenant"]) == (
        "mtls", ca.cert.subject.rfc4514_string(), "acme")

    stranger = issue(ca, "stranger", uris=("spiffe://cluster.local/ns/umbrella/sa/x",))
    status, body = await post(url, ssl_context=client_context(ca, stranger, certs))
    assert status == 401 and body["error"]["code"] == "unknown_peer"

    # A certificate from another CA, or none, never reaches the sidecar: Envoy ends the handshake.
    for client in (issue(make_ca("rogue CA"), "rogue", uris=(SPIFFE_ACME,)), None):
        with pytest.raises(aiohttp.ClientError):
            await post(url, ssl_context=client_context(ca, client, certs))
    assert len(stack.decisions()) == 2


async def test_peer_attributes_cannot_be_forged_with_headers(tmp_path: Path, stacks: list[AuthzStack],
                                                            transport: str) -> None:
    """The HTTP transport carries what Envoy knows of the TLS peer in x-kernelgate-authz-* headers;
    a client sending those itself (here over plain HTTP) must not become the certificate's tenant."""
    ca = make_ca()
    acme = issue(ca, "acme batch", uris=(SPIFFE_ACME,))
    stack = AuthzStack(tmp_path, transport=transport, authz_overrides={"identity": {"mtls": {
        "enabled": True, "identities": {SPIFFE_ACME: {"tenant": "acme", "tier": "pro", "scopes": ["*"]}}}}})
    stacks.append(stack)
    stack.start()
    forged = {"x-kernelgate-authz-source-certificate": quote(acme.cert_pem.decode()),
              "x-kernelgate-authz-source-uri-san": SPIFFE_ACME, "x-kernelgate-authz-source-subject": "CN=acme"}
    status, body = await post(stack.url, headers=forged)
    record = stack.decisions()[-1]
    assert record["identity_method"] != "mtls" and record["tenant"] != "acme", record
    assert status == 401 and body["error"]["code"] == "missing_credentials", body


# --- a real identity provider, then its outage ---------------------------------------------------


async def identity_health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kernelgate.identity"), timeout=5)
        return reply.status


async def wait_identity_health(port: int, want: int, timeout_s: float = 10.0) -> bool:
    """True once ``kernelgate.identity`` reports ``want`` (the sidecar re-checks every second)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await identity_health(port) == want:
            return True
        await asyncio.sleep(0.1)
    return False


async def metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            return await resp.text()


async def test_hydra_tokens_through_envoy_and_provider_outage(tmp_path: Path, stacks: list[AuthzStack],
                                                              transport: str) -> None:
    hydra: Hydra = start_hydra(tmp_path / "hydra")
    try:
        jwt_secret = hydra.create_client("acme", audience=[AUDIENCE])
        opaque_secret = hydra.create_client("globex", audience=[AUDIENCE], token_strategy="opaque")
        workdir = tmp_path / "stack"
        workdir.mkdir()
        # Timeouts for a busy CI machine; the outage is seen through connection refusals anyway.
        stack = AuthzStack(workdir, transport=transport, envoy_overrides={"authz_timeout_s": 5.0},
                           authz_overrides={"identity": {
            "issuers": [{"issuer": hydra.issuer, "audiences": [AUDIENCE], "refresh_interval_s": 0.5,
                         "retry_interval_s": 0.2, "fetch_timeout_s": 5, "check_wait_s": 5,
                         "claims": {"tenant": "client_id", "scopes": "scp", "tier": None}}],
            "introspection": {"url": hydra.introspection_url, "name": "hydra",
                              "claims": {"tenant": "client_id", "scopes": "scope", "tier": None}}}})
        stacks.append(stack)
        stack.start()

        token = hydra.token("acme", jwt_secret, audience=AUDIENCE)
        unseen = hydra.token("acme", jwt_secret, audience=AUDIENCE)
        opaque = hydra.token("globex", opaque_secret, audience=AUDIENCE)
        status, echo = await post(stack.url, {"authorization": f"Bearer {token}"})
        assert status == 200, echo
        assert echo["headers"]["x-kernelgate-tenant"] == "acme"
        assert "authorization" not in echo["headers"]
        status, echo = await post(stack.url, {"authorization": f"Bearer {opaque}"})
        assert status == 200, echo
        assert echo["headers"]["x-kernelgate-tenant"] == "globex"
        records = stack.decisions()
        assert [(r["identity_method"], r["identity_issuer"]) for r in records[-2:]] == [
            ("oidc", hydra.issuer), ("introspection", hydra.issuer)]
        assert await wait_identity_health(stack.authz_port, health_pb2.HealthCheckResponse.SERVING)
        # A refusal says which method and issuer refused it.
        forged = jwt.encode({"iss": hydra.issuer, "aud": AUDIENCE, "client_id": "acme"},
                            rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                            headers={"kid": "not-hydras"})
        status, body = await post(stack.url, {"authorization": f"Bearer {forged}"})
        assert status == 401 and body["error"]["code"] == "unknown_kid"
        record = stack.decisions()[-1]
        assert (record["identity_method"], record["identity_issuer"], record["tenant"]) == ("oidc", hydra.issuer, None)

        hydra.stop()
        assert await wait_identity_health(stack.authz_port, health_pb2.HealthCheckResponse.NOT_SERVING)
        up = [s.value for family in text_string_to_metric_families(await metrics_text(stack.metrics_port))
              for s in family.samples if s.name == "kernelgate_authz_identity_provider_up"
              and s.labels == {"provider": hydra.issuer, "method": "oidc"}]
        assert up == [0.0]

        # The sidecar itself still serves, on the keys it fetched before the outage.
        status, echo = await post(stack.url, {"authorization": f"Bearer {unseen}"})
        assert status == 200, echo
        assert echo["headers"]["x-kernelgate-tenant"] == "acme"
        assert stack.decisions()[-1]["identity_method"] == "oidc"
    finally:
        hydra.stop()
