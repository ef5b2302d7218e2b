"""Identity: API keys and JWTs (real HS256/RS256/ES256 keys), reloads, and no secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

from sidecar.config import IdentityConfig, JwtConfig
from sidecar.identity import (
    ANONYMOUS,
    AuthError,
    Authenticator,
    CredentialFileError,
    hash_api_key,
    make_api_key_entry,
)

NOW = 1_700_000_000.0
ISSUER = "https://issuer.test"
AUDIENCE = "kernelgate"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Keys:
    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey
    hmac_secret: bytes


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_private=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_private=ec.generate_private_key(ec.SECP256R1()),
        hmac_secret=os.urandom(32),
    )


def write_jwks(path: Path, keys: Keys) -> None:
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa_private.public_key(), as_dict=True) | {"kid": "rsa-1", "use": "sig"}
    ec_jwk = ECAlgorithm.to_jwk(keys.ec_private.public_key(), as_dict=True) | {"kid": "ec-1"}
    oct_jwk = HMACAlgorithm.to_jwk(keys.hmac_secret, as_dict=True) | {"kid": "hs-1"}
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk, oct_jwk]}))


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, str]:
    key, entry = make_api_key_entry("acme", tier="gold", scopes=["completions", "embeddings"], name="ci-bot")
    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps(entry))
    return path, key


@pytest.fixture
def config(tmp_path: Path, keys: Keys, key_file: tuple[Path, str]) -> IdentityConfig:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, keys)
    return IdentityConfig(
        api_keys_file=str(key_file[0]),
        jwt=JwtConfig(jwks_file=str(jwks), issuer=ISSUER, audience=AUDIENCE, leeway_s=5.0),
    )


@pytest.fixture
def auth(config: IdentityConfig, clock: FakeClock) -> Authenticator:
    return Authenticator(config, clock=clock)


def claims(**overrides: object) -> dict:
    base = {"sub": "user-1", "tenant": "acme", "tier": "silver", "scope": "completions chat",
            "iss": ISSUER, "aud": AUDIENCE, "iat": int(NOW), "exp": int(NOW) + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: Keys, alg: str, kid: str | None, **overrides: object) -> str:
    key = {"RS256": keys.rsa_private, "ES256": keys.ec_private, "HS256": keys.hmac_secret}[alg]
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def reason_of(auth: Authenticator, headers: dict[str, str]) -> str:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(headers)
    return info.value.reason


# --- API keys -------------------------------------------------------------------------------


async def test_no_credentials_is_anonymous(auth: Authenticator) -> None:
    assert await auth.authenticate({}) is ANONYMOUS
    assert ANONYMOUS.to_input() == {"authenticated": False, "method": "anonymous", "tenant": None,
                                    "tier": None, "scopes": [], "subject": None, "issuer": None}


async def test_valid_api_key_by_header_and_bearer(auth: Authenticator, key_file: tuple[Path, str]) -> None:
    _, key = key_file
    identity = await auth.authenticate({"x-api-key": key})
    assert (identity.method, identity.tenant, identity.tier, identity.key_name) == ("api_key", "acme", "gold", "ci-bot")
    assert identity.scopes == ("completions", "embeddings")
    assert identity.to_input() == {"authenticated": True, "method": "api_key", "tenant": "acme", "tier": "gold",
                                   "scopes": ["completions", "embeddings"], "subject": None,
                                   "issuer": None}
    assert await auth.authenticate(bearer(key)) == identity
    assert await auth.authenticate({"authorization": f"bearer   {key}  "}) == identity


async def test_unknown_api_key(auth: Authenticator) -> None:
    assert await reason_of(auth, {"x-api-key": "kg_not-a-real-key"}) == "invalid_api_key"
    assert await reason_of(auth, bearer("kg_not-a-real-key")) == "invalid_api_key"
    assert await reason_of(auth, {"x-api-key": ""}) == "invalid_api_key"
    assert await reason_of(auth, {"x-api-key": "x" * 10_000}) == "invalid_api_key"


async def test_custom_api_key_header(config: IdentityConfig, key_file: tuple[Path, str]) -> None:
    auth = Authenticator(replace(config, api_key_header="X-Kernelgate-Key"))
    assert (await auth.authenticate({"x-kernelgate-key": key_file[1]})).tenant == "acme"
    assert await auth.authenticate({"x-api-key": key_file[1]}) is ANONYMOUS


async def test_bad_authorization_headers(auth: Authenticator, key_file: tuple[Path, str]) -> None:
    assert await reason_of(auth, {"authorization": "Basic dXNlcjpwYXNz"}) == "unsupported_scheme"
    assert await reason_of(auth, {"authorization": "Bearer "}) == "malformed_token"
    both = {"x-api-key": key_file[1], **bearer(key_file[1])}
    with pytest.raises(AuthError) as info:
        await auth.authenticate(both)
    assert info.value.reason == "ambiguous_credentials"
    assert info.value.www_authenticate.startswith('Bearer error="invalid_request"')


async def test_api_key_file_reload_and_broken_file_keeps_keys(
    auth: Authenticator, key_file: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    path, old_key = key_file
    assert auth.maybe_reload() is False  # unchanged: one stat, nothing read
    new_key, entry = make_api_key_entry("globex", name="second")
    write_atomically(path, json.dumps(entry))
    assert auth.maybe_reload() is True
    assert (await auth.authenticate({"x-api-key": new_key})).tenant == "globex"
    assert await reason_of(auth, {"x-api-key": old_key}) == "invalid_api_key"

    caplog.set_level(logging.DEBUG)
    broken = '{"' + hash_api_key(new_key) + '": {tenant: [unclosed'
    write_atomically(path, broken)
    assert auth.maybe_reload() is False
    assert (await auth.authenticate({"x-api-key": new_key})).tenant == "globex"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "keeping the previous version" in errors[0].getMessage()
    assert hash_api_key(new_key) not in caplog.text and "unclosed" not in caplog.text

    write_atomically(path, "{}")  # an empty key set is allowed when written explicitly
    assert auth.maybe_reload() is True
    assert await reason_of(auth, {"x-api-key": new_key}) == "invalid_api_key"


def test_empty_or_invalid_key_file_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    for text in ["", "[]", '{"abc": {tenant: acme}}', '{"' + "a" * 64 + '": {tier: gold}}']:
        path.write_text(text)
        with pytest.raises(CredentialFileError):
            Authenticator(IdentityConfig(api_keys_file=str(path)))


async def test_watch_reloads_until_stopped(config: IdentityConfig, key_file: tuple[Path, str]) -> None:
    auth = Authenticator(replace(config, reload_interval_s=0.01))
    stop = asyncio.Event()
    task = asyncio.create_task(auth.watch(stop))
    new_key, entry = make_api_key_entry("initech")
    write_atomically(key_file[0], json.dumps(entry))
    for _ in range(200):
        await asyncio.sleep(0.01)
        try:
            if (await auth.authenticate({"x-api-key": new_key})).tenant == "initech":
                break
        except AuthError:
            pass
    assert (await auth.authenticate({"x-api-key": new_key})).tenant == "initech"
    stop.set()
    await asyncio.wait_for(task, 1)


def test_make_api_key_entry_refuses_dotted_keys() -> None:
    with pytest.raises(ValueError):
        make_api_key_entry("acme", key="a.b.c")


# --- JWT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,kid", [("RS256", "rsa-1"), ("ES256", "ec-1"), ("HS256", "hs-1"),
                                     ("RS256", None), ("ES256", None), ("HS256", None)])
async def test_valid_jwt_each_algorithm(auth: Authenticator, keys: Keys, alg: str, kid: str | None) -> None:
    identity = await auth.authenticate(bearer(sign(keys, alg, kid)))
    assert identity.to_input() == {"authenticated": True, "method": "jwt", "tenant": "acme", "tier": "silver",
                                   "scopes": ["completions", "chat"], "subject": "user-1",
                                   "issuer": ISSUER}


async def test_scopes_as_list(auth: Authenticator, keys: Keys) -> None:
    identity = await auth.authenticate(bearer(sign(keys, "ES256", "ec-1", scope=["a", "b"])))
    assert identity.scopes == ("a", "b")


async def test_expired_and_cached_token_expires(auth: Authenticator, keys: Keys, clock: FakeClock) -> None:
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-1", exp=int(NOW) - 10))) == "token_expired"
    assert (await auth.authenticate(bearer(sign(keys, "RS256", "rsa-1", exp=int(NOW) - 3)))).tenant == "acme"  # leeway 5 s
    token = sign(keys, "RS256", "rsa-1")
    assert (await auth.authenticate(bearer(token))).tenant == "acme"
    clock.now = NOW + 300 + 5  # exp + leeway: expired, though verified (and cached) before
    with pytest.raises(AuthError) as info:
        await auth.authenticate(bearer(token))
    assert info.value.reason == "token_expired"
    assert info.value.www_authenticate == 'Bearer error="invalid_token", error_description="token expired"'


async def test_not_yet_valid(auth: Authenticator, keys: Keys, clock: FakeClock) -> None:
    token = sign(keys, "ES256", "ec-1", nbf=int(NOW) + 60)
    assert await reason_of(auth, bearer(token)) == "token_not_yet_valid"
    clock.now = NOW + 56  # within the 5 s leeway
    assert (await auth.authenticate(bearer(token))).tenant == "acme"


async def test_wrong_issuer_and_audience(auth: Authenticator, keys: Keys) -> None:
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-1", iss="https://evil.test"))) == "wrong_issuer"
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-1", iss=None))) == "wrong_issuer"
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-1", aud="other"))) == "wrong_audience"
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-1", aud=None))) == "wrong_audience"
    assert (await auth.authenticate(bearer(sign(keys, "RS256", "rsa-1", aud=["other", AUDIENCE])))).tenant == "acme"


async def test_issuer_and_audience_unchecked_when_not_configured(config: IdentityConfig, keys: Keys,
                                                           clock: FakeClock) -> None:
    auth = Authenticator(replace(config, jwt=replace(config.jwt, issuer=None, audience=None)), clock=clock)
    assert (await auth.authenticate(bearer(sign(keys, "RS256", "rsa-1", iss="any", aud="any")))).tenant == "acme"


async def test_wrong_signature(auth: Authenticator, keys: Keys) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa-1"})
    assert await reason_of(auth, bearer(token)) == "bad_signature"
    header, payload, signature = sign(keys, "HS256", "hs-1").split(".")
    tampered = b64(json.dumps(claims(tenant="globex")).encode())
    assert await reason_of(auth, bearer(f"{header}.{tampered}.{signature}")) == "bad_signature"


async def test_alg_none_refused(auth: Authenticator) -> None:
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(claims()).encode())}."
        assert await reason_of(auth, bearer(token)) == "alg_not_allowed"


async def test_alg_not_in_config_refused(config: IdentityConfig, keys: Keys, clock: FakeClock) -> None:
    auth = Authenticator(replace(config, jwt=replace(config.jwt, algorithms=["RS256"])), clock=clock)
    assert await reason_of(auth, bearer(sign(keys, "ES256", "ec-1"))) == "alg_not_allowed"


async def test_hs256_signed_with_rsa_public_key_refused(auth: Authenticator, keys: Keys) -> None:
    """The classic key-confusion attack: the public key PEM used as an HMAC secret."""
    pem = keys.rsa_private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
        signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64(signature)}"
        # With the RSA kid: the key does not fit HS256. Without a kid: only the oct key may
        # verify HS256, and the signature does not match it.
        assert await reason_of(auth, bearer(token)) in {"alg_not_allowed", "bad_signature"}


async def test_ec_key_not_used_for_rsa_alg(auth: Authenticator, keys: Keys) -> None:
    token = jwt.encode(claims(), keys.rsa_private, algorithm="RS256", headers={"kid": "ec-1"})
    assert await reason_of(auth, bearer(token)) == "alg_not_allowed"


async def test_unknown_kid(auth: Authenticator, keys: Keys) -> None:
    assert await reason_of(auth, bearer(sign(keys, "RS256", "rsa-2"))) == "unknown_kid"


async def test_oversized_token(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys, "HS256", "hs-1", padding="x" * 9000)
    assert await reason_of(auth, bearer(token)) == "token_too_large"


@pytest.mark.parametrize("token", ["a.b.c", "!!!.@@@.###", "eyJhbGciOiJIUzI1NiJ9.e30", "....",
                                   "e30.e30.", b64(b"[1,2]") + ".e30.", "é.b.c"])
async def test_garbage_is_malformed(auth: Authenticator, token: str) -> None:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(bearer(token))
    assert info.value.reason in {"malformed_token", "invalid_api_key"}
    if token.count(".") == 2:
        assert info.value.reason == "malformed_token"


async def test_bad_time_claim_is_malformed(auth: Authenticator, keys: Keys) -> None:
    assert await reason_of(auth, bearer(sign(keys, "HS256", "hs-1", exp="tomorrow"))) == "malformed_token"


async def test_missing_tenant(auth: Authenticator, keys: Keys) -> None:
    assert await reason_of(auth, bearer(sign(keys, "ES256", "ec-1", tenant=None))) == "missing_tenant"
    assert await reason_of(auth, bearer(sign(keys, "ES256", "ec-1", tenant=""))) == "missing_tenant"


async def test_jwt_without_jwks_configured(key_file: tuple[Path, str], keys: Keys) -> None:
    auth = Authenticator(IdentityConfig(api_keys_file=str(key_file[0])))
    assert await reason_of(auth, bearer(sign(keys, "HS256", "hs-1"))) == "jwt_not_configured"


async def test_jwks_reload_drops_removed_key_and_cache(auth: Authenticator, config: IdentityConfig, keys: Keys,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    token = sign(keys, "RS256", "rsa-1")
    assert (await auth.authenticate(bearer(token))).tenant == "acme"  # now cached
    jwks_path = Path(config.jwt.jwks_file or "")
    caplog.set_level(logging.DEBUG)
    write_atomically(jwks_path, '{"keys": [{"kty": "oct", "kid": "k", "k": "c2hvcnQ"}]}')  # 5-byte secret
    assert auth.maybe_reload() is False  # too short an HMAC key: rejected, old set kept
    assert (await auth.authenticate(bearer(token))).tenant == "acme"
    assert "c2hvcnQ" not in caplog.text
    doc = {"keys": [ECAlgorithm.to_jwk(keys.ec_private.public_key(), as_dict=True) | {"kid": "ec-1"}]}
    write_atomically(jwks_path, json.dumps(doc))
    assert auth.maybe_reload() is True
    assert await reason_of(auth, bearer(token)) == "unknown_kid"
    assert (await auth.authenticate(bearer(sign(keys, "ES256", "ec-1")))).tenant == "acme"


# --- secrets never logged -------------------------------------------------------------------


async def test_no_key_or_token_in_logs_or_errors(auth: Authenticator, keys: Keys, key_file: tuple[Path, str],
                                           config: IdentityConfig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_seen = [key_file[1], "kg_wrong-key-123", keys.hmac_secret.hex(), b64(keys.hmac_secret)]
    attempts = [
        {"x-api-key": key_file[1]}, {"x-api-key": "kg_wrong-key-123"}, bearer("kg_wrong-key-123"),
        bearer(sign(keys, "HS256", "hs-1")), bearer(sign(keys, "HS256", "hs-1", exp=int(NOW) - 100)),
        bearer(sign(keys, "HS256", "nope")), bearer(sign(keys, "HS256", "hs-1", tenant=None)),
        bearer(sign(keys, "HS256", "hs-1", aud="x")),
    ]
    for headers in attempts:
        token = headers.get("authorization", "").removeprefix("Bearer ")
        if token:
            secrets_seen.append(token)
        try:
            await auth.authenticate(headers)
        except AuthError as exc:
            for secret in secrets_seen:
                assert secret not in str(exc) and secret not in exc.www_authenticate
    # A broken JWKS that holds the HMAC secret: the error must not quote it.
    write_atomically(Path(config.jwt.jwks_file or ""),
                     '{"keys": [{"kty": "oct", "k": "' + b64(keys.hmac_secret) + '", "alg": "RS256"}]')
    auth.maybe_reload()
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in secrets_seen:
            assert secret not in text
