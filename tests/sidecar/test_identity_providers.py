"""Identity from a real identity provider (Ory Hydra): OIDC JWTs with fetched, rotated keys,
introspection of opaque tokens, and what happens when the provider goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.settings import build
from sidecar.config import IdentityConfig
from sidecar.identity import AuthError, Authenticator, IdentityUnavailable
from sidecar.metrics import SidecarMetrics
from tests.hydra import ClaimsHook, Hydra, start_hydra
from tests.procs import free_port

AUDIENCE = "kernelgate"
CLAIMS = {"tenant": "client_id", "scopes": "scp", "subject": "sub", "tier": None}


class Clock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def identity_config(hydra: Hydra, **issuer: object) -> IdentityConfig:
    raw = {
        # check_wait_s: generous, for a busy CI machine (production default 0.5 s).
        "issuers": [{"issuer": hydra.issuer, "audiences": [AUDIENCE], "claims": CLAIMS, "check_wait_s": 5, **issuer}],
        "introspection": {"url": hydra.introspection_url, "name": "hydra-introspection",
                          "claims": {"tenant": "client_id", "scopes": "scope", "tier": None}},
    }
    return build(IdentityConfig, raw, "authz.identity")


@contextlib.asynccontextmanager
async def watching(auth: Authenticator) -> AsyncIterator[Authenticator]:
    """``auth`` with its background refresh running (as in the sidecar), stopped and closed after."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(auth.watch(stop))
    try:
        yield auth
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 5)
        await auth.close()


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    """The value of one series as a scrape would show it."""
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def reason_of(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(bearer(token))
    return info.value.reason


@pytest.fixture(scope="module")
def hydra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hydra]:
    server = start_hydra(tmp_path_factory.mktemp("hydra"))
    server.secrets = {  # type: ignore[attr-defined]
        "acme": server.create_client("acme", audience=[AUDIENCE]),
        "globex": server.create_client("globex", audience=[AUDIENCE], token_strategy="opaque"),
        "elsewhere": server.create_client("elsewhere", audience=["another-api"]),
    }
    yield server
    server.stop()


def token_for(hydra: Hydra, client: str, audience: str | None = AUDIENCE) -> str:
    return hydra.token(client, hydra.secrets[client], audience=audience)  # type: ignore[attr-defined]


# --- OIDC: JWT access tokens verified with keys fetched from Hydra ------------------------------


async def test_client_credentials_jwt_accepted(hydra: Hydra) -> None:
    auth = Authenticator(identity_config(hydra))
    token = token_for(hydra, "acme")
    identity = await auth.authenticate(bearer(token))
    assert (identity.method, identity.tenant, identity.subject, identity.issuer) == (
        "oidc", "acme", "acme", hydra.issuer)
    assert set(identity.scopes) == {"completions", "models"}
    assert identity.to_input()["issuer"] == hydra.issuer
    [status] = [s for s in auth.provider_status() if s.method == "oidc"]
    assert status.up and status.fetches_ok == 1 and status.keys >= 1
    assert await auth.authenticate(bearer(token)) == identity  # cached: no second fetch
    assert auth.provider_status()[0].fetches_ok == 1
    await auth.close()


async def test_audience_and_issuer_enforced(hydra: Hydra) -> None:
    auth = Authenticator(identity_config(hydra))
    with pytest.raises(AuthError) as info:
        await auth.authenticate(bearer(token_for(hydra, "elsewhere", audience="another-api")))
    assert info.value.reason == "wrong_audience"
    # The refusal names the method and issuer that refused (the decision log records them).
    assert (info.value.identity.method, info.value.identity.issuer, info.value.identity.authenticated) == (
        "oidc", hydra.issuer, False)
    assert await reason_of(auth, token_for(hydra, "acme", audience=None)) == "wrong_audience"
    # Signed by someone else in Hydra's name: the kid is not Hydra's.
    forged = jwt.encode({"iss": hydra.issuer, "aud": AUDIENCE, "client_id": "acme", "exp": time.time() + 60},
                        rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": "not-hydras"})
    assert await reason_of(auth, forged) == "unknown_kid"
    no_exp = jwt.encode({"iss": hydra.issuer, "aud": AUDIENCE, "client_id": "acme"}, "x" * 32, algorithm="HS256")
    assert await reason_of(auth, no_exp) == "alg_not_allowed"  # never HMAC from a provider's key set
    stranger = jwt.encode({"iss": "https://stranger.test", "aud": AUDIENCE, "client_id": "acme"},
                          rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")
    assert await reason_of(auth, stranger) == "unknown_issuer"
    await auth.close()


async def test_several_issuers_each_with_its_audience_and_claims(hydra: Hydra, tmp_path: Path) -> None:
    second = start_hydra(tmp_path / "hydra-2")
    try:
        secret = second.create_client("svc-billing", audience=["kernelgate-eu"], scope="embeddings")
        raw = {"issuers": [
            {"issuer": hydra.issuer, "audiences": [AUDIENCE], "claims": CLAIMS, "check_wait_s": 5},
            # Another provider: its own audience; the tenant is the client's ``sub``, scopes as given.
            {"issuer": second.issuer, "audiences": ["kernelgate-eu"], "check_wait_s": 5,
             "claims": {"tenant": "sub", "scopes": "scp", "subject": "client_id", "tier": None}},
        ]}
        auth = Authenticator(build(IdentityConfig, raw, "authz.identity"))
        first = await auth.authenticate(bearer(token_for(hydra, "acme")))
        other = await auth.authenticate(bearer(second.token("svc-billing", secret, scope="embeddings",
                                                             audience="kernelgate-eu")))
        assert (first.tenant, first.issuer) == ("acme", hydra.issuer)
        assert (other.tenant, other.issuer, other.scopes, other.method) == (
            "svc-billing", second.issuer, ("embeddings",), "oidc")
        # Each issuer's audience is its own: the first provider's token for the second's audience is refused.
        eu_secret = hydra.create_client("acme-eu", audience=["kernelgate-eu"])
        assert await reason_of(auth, hydra.token("acme-eu", eu_secret, audience="kernelgate-eu")) == "wrong_audience"
        assert {s.name for s in auth.provider_status()} == {hydra.issuer, second.issuer}
        await auth.close()
    finally:
        second.stop()


async def test_custom_claims_map_tenant_tier_and_scopes(tmp_path: Path) -> None:
    """The provider adds claims of its own (Hydra's token hook, nested under ``ext``); the
    issuer's claim mapping reads tenant and tier from there."""
    hook = ClaimsHook({"ci-runner": {"org": {"tenant": "globex", "plan": "free"}}})
    hydra = start_hydra(tmp_path / "hydra", token_hook_url=hook.url)
    try:
        secret = hydra.create_client("ci-runner", audience=[AUDIENCE], scope="completions")
        auth = Authenticator(identity_config(hydra, claims={
            "tenant": ["ext", "org", "tenant"], "tier": ["ext", "org", "plan"], "scopes": "scp"}))
        token = hydra.token("ci-runner", secret, scope="completions", audience=AUDIENCE)
        identity = await auth.authenticate(bearer(token))
        assert (identity.tenant, identity.tier, identity.scopes, identity.subject) == (
            "globex", "free", ("completions",), "ci-runner")
        await auth.close()
    finally:
        hydra.stop()
        hook.close()


async def test_rotated_key_accepted_without_restart(hydra: Hydra) -> None:
    auth = Authenticator(identity_config(hydra, min_refresh_interval_s=0.2))
    before = token_for(hydra, "acme")
    assert (await auth.authenticate(bearer(before))).tenant == "acme"
    old_kid = jwt.get_unverified_header(before)["kid"]

    hydra.rotate_access_token_key("rotated-1")
    after = token_for(hydra, "acme")
    new_kid = jwt.get_unverified_header(after)["kid"]
    assert new_kid != old_kid  # Hydra signs with the new key now
    await asyncio.sleep(0.3)  # past min_refresh_interval_s since the first fetch
    assert (await auth.authenticate(bearer(after))).tenant == "acme"
    assert auth.provider_status()[0].fetches_ok == 2  # the unknown kid fetched the keys once more
    assert (await auth.authenticate(bearer(before))).tenant == "acme"  # the old key is still published
    await auth.close()


async def test_withdrawn_key_revokes_its_cached_tokens(tmp_path: Path) -> None:
    hydra = start_hydra(tmp_path / "hydra")
    try:
        secret = hydra.create_client("acme", audience=[AUDIENCE])
        async with watching(Authenticator(identity_config(hydra, refresh_interval_s=0.3))) as auth:
            before = hydra.token("acme", secret, audience=AUDIENCE)
            assert (await auth.authenticate(bearer(before))).tenant == "acme"  # verified and cached
            hydra.rotate_access_token_key("rotated-1")
            hydra.delete_access_token_key(jwt.get_unverified_header(before)["kid"])
            fetched = auth.provider_status()[0].fetches_ok
            for _ in range(100):  # the scheduled refresh sees the key gone
                await asyncio.sleep(0.1)
                if auth.provider_status()[0].fetches_ok > fetched:
                    break
            assert await reason_of(auth, before) == "unknown_kid"  # the cache no longer vouches for it
            after = hydra.token("acme", secret, audience=AUDIENCE)
            assert (await auth.authenticate(bearer(after))).tenant == "acme"
    finally:
        hydra.stop()


async def test_forged_kids_cannot_hammer_the_provider(hydra: Hydra) -> None:
    auth = Authenticator(identity_config(hydra, min_refresh_interval_s=60))
    assert (await auth.authenticate(bearer(token_for(hydra, "acme")))).tenant == "acme"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(50):
        forged = jwt.encode({"iss": hydra.issuer, "aud": AUDIENCE, "client_id": "acme"}, key,
                            algorithm="RS256", headers={"kid": f"forged-{i}"})
        assert await reason_of(auth, forged) == "unknown_kid"
    status = auth.provider_status()[0]
    assert status.fetches_ok == 1 and status.refreshes_rate_limited == 50
    await auth.close()


async def test_expired_token_refused(hydra: Hydra) -> None:
    clock = Clock()
    auth = Authenticator(identity_config(hydra, leeway_s=0), clock=clock)
    token = token_for(hydra, "acme")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert (await auth.authenticate(bearer(token))).tenant == "acme"  # verified and cached
    clock.offset = exp - time.time() + 1
    assert await reason_of(auth, token) == "token_expired"  # the cached entry expires too
    fresh = token_for(hydra, "acme")  # never seen, already expired by the clock
    clock.offset = jwt.decode(fresh, options={"verify_signature": False})["exp"] - time.time() + 1
    assert await reason_of(auth, fresh) == "token_expired"
    await auth.close()


# --- Introspection of opaque tokens ----------------------------------------------------------


async def test_opaque_token_introspected_and_cached(hydra: Hydra) -> None:
    auth = Authenticator(identity_config(hydra))
    token = token_for(hydra, "globex")
    assert token.count(".") != 2  # opaque, not a JWT
    identity = await auth.authenticate(bearer(token))
    assert (identity.method, identity.tenant, identity.issuer) == ("introspection", "globex", hydra.issuer)
    assert set(identity.scopes) == {"completions", "models"}
    assert await auth.authenticate(bearer(token)) == identity
    status = next(s for s in auth.provider_status() if s.method == "introspection")
    assert status.fetches_ok == 1 and status.keys == 1  # the second check was a cache hit
    assert await reason_of(auth, "ory_at_not-a-token.really") == "token_inactive"
    await auth.close()


async def test_revoked_token_refused(hydra: Hydra) -> None:
    clock = Clock()
    auth = Authenticator(identity_config(hydra), clock=clock)
    secret = hydra.secrets["globex"]  # type: ignore[attr-defined]
    revoked_first = token_for(hydra, "globex")
    hydra.revoke("globex", secret, revoked_first)
    assert await reason_of(auth, revoked_first) == "token_inactive"

    token = token_for(hydra, "globex")
    assert (await auth.authenticate(bearer(token))).tenant == "globex"
    hydra.revoke("globex", secret, token)
    # The cached answer holds for cache_ttl_s (30 s by default): the documented revocation delay.
    assert (await auth.authenticate(bearer(token))).tenant == "globex"
    clock.offset = 31
    assert await reason_of(auth, token) == "token_inactive"
    await auth.close()


# --- The provider goes away ------------------------------------------------------------------


async def test_provider_down_cached_keys_keep_working_and_outage_is_visible(tmp_path: Path) -> None:
    hydra = start_hydra(tmp_path / "hydra")
    try:
        secret = hydra.create_client("acme", audience=[AUDIENCE])
        opaque_secret = hydra.create_client("globex", audience=[AUDIENCE], token_strategy="opaque")
        config = identity_config(hydra, refresh_interval_s=0.3, retry_interval_s=0.1, fetch_timeout_s=5)
        async with watching(Authenticator(config)) as auth:
            registry = CollectorRegistry()
            SidecarMetrics(registry).watch_identity_providers(auth.provider_status)

            first = hydra.token("acme", secret, audience=AUDIENCE)
            later = hydra.token("acme", secret, audience=AUDIENCE)  # minted now, first shown after the outage
            opaque = hydra.token("globex", opaque_secret, audience=AUDIENCE)
            opaque_later = hydra.token("globex", opaque_secret, audience=AUDIENCE)
            assert (await auth.authenticate(bearer(first))).tenant == "acme"
            assert (await auth.authenticate(bearer(opaque))).tenant == "globex"
            oidc_labels = {"provider": hydra.issuer, "method": "oidc"}
            assert sample(registry, "kernelgate_authz_identity_provider_up", oidc_labels) == 1.0

            hydra.stop()
            for _ in range(50):  # the scheduled refresh notices within ~0.3 s
                await asyncio.sleep(0.1)
                if not auth.provider_status()[0].up:
                    break
            oidc = auth.provider_status()[0]
            assert not oidc.up and oidc.degraded and oidc.keys >= 1 and oidc.last_error
            assert sample(registry, "kernelgate_authz_identity_provider_up", oidc_labels) == 0.0
            assert sample(registry, "kernelgate_authz_identity_provider_fetches_total",
                          {**oidc_labels, "outcome": "error"}) >= 1

            # Cached keys verify a token never seen before; a cached introspection answer still holds.
            identity = await auth.authenticate(bearer(later))
            assert (identity.tenant, identity.method) == ("acme", "oidc")
            assert (await auth.authenticate(bearer(opaque))).tenant == "globex"
            # What needs the provider now fails fast and says why: 503 for an uncached opaque token.
            started = time.monotonic()
            with pytest.raises(IdentityUnavailable) as info:
                await auth.authenticate(bearer(opaque_later))
            assert info.value.reason == "introspection_unavailable" and info.value.http_status == 503
            assert time.monotonic() - started < 2
            assert next(s for s in auth.provider_status() if s.method == "introspection").degraded

    finally:
        hydra.stop()


async def test_issuer_never_reached_is_503(tmp_path: Path) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    auth = Authenticator(build(IdentityConfig, {"issuers": [{"issuer": issuer, "audiences": [AUDIENCE],
                                                             "check_wait_s": 0.5}]}, "authz.identity"))
    token = jwt.encode({"iss": issuer, "aud": AUDIENCE, "tenant": "acme"},
                       rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                       headers={"kid": "k"})
    with pytest.raises(IdentityUnavailable) as info:
        await auth.authenticate(bearer(token))
    assert info.value.reason == "issuer_unreachable" and info.value.http_status == 503
    assert info.value.response_headers == {"retry-after": "1"}
    status = auth.provider_status()[0]
    assert not status.up and status.fetches_failed == 1 and status.last_success_age_s is None
    await auth.close()
