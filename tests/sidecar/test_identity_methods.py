"""Identity methods that need no provider: mTLS peer certificates, claim mapping, and the
configuration of issuers, introspection and mTLS (bad keys named by their dotted path)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from common.settings import ConfigError, build
from sidecar.config import KUBERNETES_CLAIMS, ClaimMapping, IdentityConfig, OidcIssuerConfig
from sidecar.identity import ANONYMOUS, AuthError, Authenticator
from sidecar.identity.claims import claim, identity_from_claims
from sidecar.identity.jwks import parse_jwks_document
from sidecar.identity.jwt import TokenRules, read_header, verify_signed
from tests.certs import issue, make_ca

SPIFFE_ACME = "spiffe://cluster.local/ns/acme/sa/batch"


def mtls_auth() -> Authenticator:
    return Authenticator(build(IdentityConfig, {"mtls": {"enabled": True, "identities": {
        SPIFFE_ACME: {"tenant": "acme", "tier": "pro", "scopes": ["completions"], "name": "acme-batch"}}}},
        "authz.identity"))


# --- mTLS ---------------------------------------------------------------------------------------


async def test_mtls_certificate_mapped_to_tenant() -> None:
    ca = make_ca()
    client = issue(ca, "acme batch", uris=("https://not-spiffe.test/x", SPIFFE_ACME))
    auth = mtls_auth()
    identity = await auth.authenticate({}, peer_principal="https://not-spiffe.test/x",
                                       peer_certificate=client.envoy_form)
    assert (identity.method, identity.tenant, identity.tier, identity.subject, identity.key_name) == (
        "mtls", "acme", "pro", SPIFFE_ACME, "acme-batch")
    assert identity.scopes == ("completions",)
    assert identity.issuer == ca.cert.subject.rfc4514_string()
    # Envoy without include_peer_certificate: the principal (first URI SAN) alone.
    assert (await auth.authenticate({}, peer_principal=SPIFFE_ACME)).tenant == "acme"


async def test_mtls_unmapped_or_broken_certificate_refused() -> None:
    ca = make_ca()
    auth = mtls_auth()
    stranger = issue(ca, "stranger", uris=("spiffe://cluster.local/ns/other/sa/x",))
    for _ in range(2):  # the second answer comes from the per-certificate cache
        with pytest.raises(AuthError) as info:
            await auth.authenticate({}, peer_certificate=stranger.envoy_form)
        assert info.value.reason == "unknown_peer" and info.value.http_status == 401
        assert info.value.identity.method == "mtls"
    with pytest.raises(AuthError) as info:
        await auth.authenticate({}, peer_certificate="-----BEGIN%20CERTIFICATE-----%0Agarbage")
    assert info.value.reason == "malformed_certificate"
    with pytest.raises(AuthError) as info:
        await auth.authenticate({}, peer_principal="spiffe://cluster.local/ns/other/sa/x")
    assert info.value.reason == "unknown_peer"
    assert await auth.authenticate({}) is ANONYMOUS  # plain connection, no credentials


async def test_header_credentials_take_precedence_over_the_certificate() -> None:
    ca = make_ca()
    auth = mtls_auth()
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"x-api-key": "kg_unknown"}, peer_certificate=issue(
            ca, "acme", uris=(SPIFFE_ACME,)).envoy_form)
    assert info.value.reason == "invalid_api_key"


async def test_mtls_off_ignores_certificates() -> None:
    ca = make_ca()
    auth = Authenticator(IdentityConfig())
    assert await auth.authenticate({}, peer_certificate=issue(ca, "x", uris=(SPIFFE_ACME,)).envoy_form) is ANONYMOUS


# --- claim mapping ------------------------------------------------------------------------------


def test_claim_paths_and_kubernetes_mapping() -> None:
    sa_claims = {"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:acme:batch",
                 "kubernetes.io": {"namespace": "acme", "serviceaccount": {"name": "batch"}}}
    assert claim(sa_claims, ["kubernetes.io", "namespace"]) == "acme"
    assert claim(sa_claims, "kubernetes.io.namespace") is None  # a string is one claim, taken whole
    assert claim(sa_claims, ["kubernetes.io", "nope", "deeper"]) is None
    identity = identity_from_claims(sa_claims, KUBERNETES_CLAIMS, "service_account", "https://kubernetes.default.svc")
    assert (identity.tenant, identity.subject, identity.tier, identity.scopes) == (
        "acme", "system:serviceaccount:acme:batch", None, ())
    namespaced = {"https://example.com/tenant": "globex", "scp": ["a", "b"]}
    mapped = identity_from_claims(namespaced, ClaimMapping(tenant="https://example.com/tenant", scopes="scp"),
                                  "oidc", "https://idp.test")
    assert (mapped.tenant, mapped.scopes) == ("globex", ("a", "b"))
    with pytest.raises(AuthError) as info:
        identity_from_claims({"tenant": 7}, ClaimMapping(), "oidc", None)
    assert info.value.reason == "missing_tenant"


def test_kubernetes_issuer_defaults() -> None:
    issuer = OidcIssuerConfig(issuer="https://kubernetes.default.svc", audiences=["kernelgate"], kind="kubernetes")
    assert issuer.method == "service_account" and issuer.claim_mapping == KUBERNETES_CLAIMS
    assert issuer.discovery == "https://kubernetes.default.svc/.well-known/openid-configuration"
    plain = OidcIssuerConfig(issuer="https://idp.test/", audiences=["a"])
    assert plain.method == "oidc" and plain.claim_mapping == ClaimMapping()
    assert plain.discovery == "https://idp.test/.well-known/openid-configuration"


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,key,words", [
    ({"issuers": [{"issuer": "https://a.test"}]}, "authz.identity.issuers[0]", "audiences"),
    ({"issuers": [{"issuer": "https://a.test", "audiences": ["x"], "algorithms": ["HS256"]}]},
     "authz.identity.issuers[0]", "HS256"),
    ({"issuers": [{"issuer": "https://a.test", "audiences": ["x"], "colour": "red"}]},
     "authz.identity.issuers[0].colour", "unknown key"),
    ({"issuers": [{"issuer": "https://a.test", "audiences": ["x"], "claims": {"tenant": 7.5j}}]},
     "authz.identity.issuers[0].claims.tenant", ""),
    ({"issuers": [{"issuer": "https://a.test", "audiences": ["x"], "refresh_interval_s": 0}]},
     "authz.identity.issuers[0]", "refresh_interval_s"),
    ({"issuers": [{"issuer": "https://a.test", "audiences": ["x"]}, {"issuer": "https://a.test", "audiences": ["y"]}]},
     "authz.identity", "issuers[1].issuer"),
    ({"introspection": {"url": "ftp://x"}}, "authz.identity.introspection", "url"),
    ({"introspection": {"url": "http://x", "client_id": "me"}}, "authz.identity.introspection", "client_secret_file"),
    ({"mtls": {"enabled": True, "identities": {"spiffe://x/y": {"tier": "pro"}}}},
     "authz.identity.mtls.identities.spiffe://x/y", "tenant"),
])
def test_bad_identity_config_names_the_key(raw: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(IdentityConfig, raw, "authz.identity")
    assert info.value.key == key
    assert words in str(info.value)


def test_claim_path_accepts_a_name_or_a_list() -> None:
    config = build(IdentityConfig, {"issuers": [{"issuer": "https://k8s.test", "audiences": ["kg"], "kind": "kubernetes",
                                                 "claims": {"tenant": ["kubernetes.io", "namespace"],
                                                            "scopes": None, "tier": None}}]}, "authz.identity")
    assert config.issuers[0].claim_mapping.tenant == ["kubernetes.io", "namespace"]


def test_provider_tokens_must_expire() -> None:
    """Tokens from an identity provider (require_exp) without ``exp`` are refused; the JWKS file's rules allow them."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "k"}
    keys = parse_jwks_document({"keys": [jwk]})
    token = pyjwt.encode({"iss": "https://idp.test", "aud": "kg", "tenant": "acme"}, key, algorithm="RS256",
                         headers={"kid": "k"})
    rules = TokenRules(algorithms=frozenset({"RS256"}), issuer="https://idp.test", audience=["kg"], leeway_s=0,
                       claims=ClaimMapping(), method="oidc", require_exp=True)
    with pytest.raises(AuthError) as info:
        verify_signed(token, read_header(token), keys, rules, time.time())
    assert info.value.reason == "malformed_token" and "exp" in info.value.message
    lax = replace(rules, require_exp=False)
    identity, exp = verify_signed(token, read_header(token), keys, lax, time.time())
    assert identity.tenant == "acme" and exp is None
