"""The sidecar behind a real Envoy, asking a real OPA (and Redis), in front of the echo upstream."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests import procs
from tests.stack import ACME_KEY, GLOBEX_KEY, INITECH_KEY, AuthzStack

COMPLETION = {"model": "tiny-gpt2", "prompt": "Hello there", "max_tokens": 8}
ISSUER, AUDIENCE = "https://auth.test", "kernelgate"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_jwks(path: Path, key: rsa.RSAPrivateKey) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    path.write_text(json.dumps({"keys": [jwk]}))


def make_token(key, **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": "acme", "tier": "pro",
            "scope": "completions models", "iat": now, "exp": now + 300}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def set_limits(stack: AuthzStack, tier: str, **limits: int) -> None:
    data_file = stack.policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["kernelgate"]["tiers"][tier]["limits"].update(limits)
    data_file.write_text(json.dumps(data))


@pytest.fixture
def make_stack(tmp_path: Path, rsa_key, transport: str) -> Iterator:
    stacks: list[AuthzStack] = []

    def factory(**kwargs) -> AuthzStack:
        workdir = tmp_path / f"stack{len(stacks)}"
        workdir.mkdir()
        stack = AuthzStack(workdir, **{"transport": transport, **kwargs})
        jwks = workdir / "jwks.json"
        write_jwks(jwks, rsa_key)
        stack.authz_overrides.setdefault("identity", {})["jwt"] = {
            "jwks_file": str(jwks), "issuer": ISSUER, "audience": AUDIENCE}
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


@pytest.fixture
def stack(make_stack) -> AuthzStack:
    return make_stack().start()


async def post(url: str, body: object = COMPLETION, headers: dict | None = None, raw: bytes | None = None,
               path: str = "/v1/completions", method: str = "POST") -> tuple[int, dict, dict]:
    hdrs = {"content-type": "application/json", **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, data=data, headers=hdrs) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"_text": text}
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, payload


async def upstream_count(stack: AuthzStack) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{stack.upstream_port}/__count") as resp:
            return (await resp.json())["count"]


# --- allow and the headers the upstream sees -------------------------------------------
async def test_allowed_request_reaches_upstream_with_identity_headers(stack: AuthzStack) -> None:
    status, headers, echo = await post(stack.url, headers={"x-api-key": ACME_KEY})
    assert status == 200, echo
    up = echo["headers"]
    assert up["x-kernelgate-tenant"] == "acme"
    assert up["x-kernelgate-tier"] == "pro"
    assert up["x-kernelgate-model"] == "tiny-gpt2"
    assert len(up["x-kernelgate-decision-id"]) == 32
    assert "x-api-key" not in up, "credentials must not reach the upstream"
    assert int(up["x-kernelgate-ratelimit-remaining-requests"]) == 599
    # the client sees its budget
    assert headers["ratelimit-limit"] and int(headers["ratelimit-remaining"]) >= 0
    log = stack.decisions()
    assert log[-1]["outcome"] == "allow" and log[-1]["tenant"] == "acme"
    assert ACME_KEY not in stack.decision_log.read_text()


async def test_jwt_identity_allows(stack: AuthzStack, rsa_key) -> None:
    status, _, echo = await post(stack.url, headers={"authorization": f"Bearer {make_token(rsa_key)}"})
    assert status == 200, echo
    assert echo["headers"]["x-kernelgate-subject"] == "user-1"
    assert "authorization" not in echo["headers"]


async def test_spoofed_kernelgate_headers_are_replaced_or_removed(stack: AuthzStack) -> None:
    status, _, echo = await post(stack.url, headers={
        "x-api-key": GLOBEX_KEY, "x-kernelgate-tenant": "acme", "x-kernelgate-tier": "pro",
        "x-kernelgate-admin": "true"})
    assert status == 200, echo
    assert echo["headers"]["x-kernelgate-tenant"] == "globex"
    assert echo["headers"]["x-kernelgate-tier"] == "free"
    assert "x-kernelgate-admin" not in echo["headers"]


# --- denials by policy ---------------------------------------------------------------------
@pytest.mark.parametrize(("key", "body", "path", "method", "status", "reason"), [
    (GLOBEX_KEY, {**COMPLETION, "model": "gpt2-medium"}, "/v1/completions", "POST", 403, "model_not_allowed"),
    (ACME_KEY, {**COMPLETION, "model": "no-such-model"}, "/v1/completions", "POST", 404, "model_not_found"),
    (ACME_KEY, COMPLETION, "/v1/nothing-here", "POST", 404, "route_not_found"),
    (ACME_KEY, None, "/v1/completions", "GET", 405, "method_not_allowed"),
    (GLOBEX_KEY, {**COMPLETION, "max_tokens": 100000}, "/v1/completions", "POST", 400, "max_tokens_over_ceiling"),
    (INITECH_KEY, COMPLETION, "/v1/completions", "POST", 403, "tenant_not_allowed"),
    (ACME_KEY, {"prompt": "x"}, "/v1/completions", "POST", 400, "missing_model"),
])
async def test_policy_denials_carry_status_and_json_body(stack: AuthzStack, key, body, path, method, status,
                                                         reason) -> None:
    before = await upstream_count(stack)
    got, headers, payload = await post(stack.url, body=body, headers={"x-api-key": key}, path=path, method=method)
    assert got == status, payload
    assert payload["error"]["code"] == reason
    assert payload["error"]["message"]
    assert headers["content-type"].startswith("application/json")
    if status == 405:
        assert "allow" in headers
    assert await upstream_count(stack) == before, "a denied request must not reach the upstream"
    assert stack.decisions()[-1]["reason"] == reason


async def test_malformed_and_oversized_bodies(stack: AuthzStack) -> None:
    status, _, payload = await post(stack.url, raw=b'{"model": "tiny-gpt2", "prompt": ', headers={"x-api-key": ACME_KEY})
    assert (status, payload["error"]["code"]) == (400, "invalid_json")
    deep = b'{"model": "tiny-gpt2", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, payload = await post(stack.url, raw=deep, headers={"x-api-key": ACME_KEY})
    assert (status, payload["error"]["code"]) == (400, "invalid_json")
    status, _, payload = await post(stack.url, raw=b"[1, 2, 3]", headers={"x-api-key": ACME_KEY})
    assert (status, payload["error"]["code"]) == (400, "invalid_json")
    big = json.dumps({**COMPLETION, "prompt": "x" * (2 << 20)}).encode()
    status, _, payload = await post(stack.url, raw=big, headers={"x-api-key": ACME_KEY})
    assert (status, payload["error"]["code"]) == (413, "body_too_large")
    # a free tenant's limit is lower than Envoy's buffer
    mid = json.dumps({**COMPLETION, "prompt": "y" * 70000}).encode()
    status, _, payload = await post(stack.url, raw=mid, headers={"x-api-key": GLOBEX_KEY})
    assert (status, payload["error"]["code"]) == (413, "body_too_large")


# --- 401 -----------------------------------------------------------------------------------
async def test_credentials_missing_malformed_expired_or_wrongly_signed_get_401(stack: AuthzStack, rsa_key) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "missing": ({}, "missing_credentials"),
        "unknown key": ({"x-api-key": "kg-not-a-key"}, "invalid_api_key"),
        "malformed jwt": ({"authorization": "Bearer abc.def.ghi"}, "malformed_token"),
        "expired": ({"authorization": f"Bearer {make_token(rsa_key, exp=int(time.time()) - 60)}"}, "token_expired"),
        "wrong signature": ({"authorization": f"Bearer {make_token(other)}"}, "bad_signature"),
        "wrong audience": ({"authorization": f"Bearer {make_token(rsa_key, aud='other')}"}, "wrong_audience"),
    }
    for name, (headers, reason) in cases.items():
        status, resp_headers, payload = await post(stack.url, headers=headers)
        assert status == 401, (name, payload)
        assert payload["error"]["code"] == reason, name
        assert resp_headers["www-authenticate"].startswith("Bearer"), name
    text = stack.decision_log.read_text()
    assert "kg-not-a-key" not in text and "abc.def.ghi" not in text


# --- rate limits -----------------------------------------------------------------------------
async def test_request_budget_gives_429_with_headers(make_stack) -> None:
    stack = make_stack()
    set_limits(stack, "free", requests=3, tokens=100000)
    stack.start()
    statuses = [(await post(stack.url, headers={"x-api-key": GLOBEX_KEY}))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers, payload = await post(stack.url, headers={"x-api-key": GLOBEX_KEY})
    assert status == 429, payload
    assert payload["error"]["code"] == "rate_limited" and "requests" in payload["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    assert headers["ratelimit-limit"] == "3"
    assert headers["ratelimit-remaining"] == "0"
    assert int(headers["ratelimit-reset"]) >= 1
    # another tenant's budget is untouched
    assert (await post(stack.url, headers={"x-api-key": ACME_KEY}))[0] == 200


async def test_token_budget_gives_429_before_request_budget(make_stack) -> None:
    stack = make_stack()
    set_limits(stack, "free", requests=100, tokens=500)
    stack.start()
    body = {**COMPLETION, "max_tokens": 200}
    assert (await post(stack.url, body=body, headers={"x-api-key": GLOBEX_KEY}))[0] == 200
    assert (await post(stack.url, body=body, headers={"x-api-key": GLOBEX_KEY}))[0] == 200
    status, headers, payload = await post(stack.url, body=body, headers={"x-api-key": GLOBEX_KEY})
    assert status == 429, payload
    assert "tokens" in payload["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    # a smaller request still fits what is left of the token budget: nothing was charged for the denied one
    assert (await post(stack.url, body={**COMPLETION, "max_tokens": 50}, headers={"x-api-key": GLOBEX_KEY}))[0] == 200


async def test_shadow_mode_counts_but_never_denies(make_stack) -> None:
    stack = make_stack(authz_overrides={"ratelimit": {"shadow": True}})
    set_limits(stack, "free", requests=1, tokens=100000)
    stack.start()
    statuses = [(await post(stack.url, headers={"x-api-key": GLOBEX_KEY}))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert [d["shadow_denied"] for d in stack.decisions()] == [False, True, True]


# --- OPA failures ----------------------------------------------------------------------------
async def test_opa_down_fails_closed_then_recovers_without_restart(stack: AuthzStack) -> None:
    assert (await post(stack.url, headers={"x-api-key": ACME_KEY}))[0] == 200
    stack.procs["opa"].kill()
    before = await upstream_count(stack)
    body = {**COMPLETION, "prompt": "a prompt not seen before, so not cached"}
    status, headers, payload = await post(stack.url, body=body, headers={"x-api-key": ACME_KEY})
    assert status == 503, payload
    assert payload["error"]["code"] == "policy_unavailable"
    assert headers["retry-after"] == "1"
    assert await upstream_count(stack) == before
    stack.start_opa()
    status, _, _ = await post(stack.url, body=body, headers={"x-api-key": ACME_KEY})
    assert status == 200


async def test_opa_down_fails_open_when_configured(make_stack) -> None:
    stack = make_stack(authz_overrides={"opa": {"failure_mode": "allow"}}).start()
    stack.procs["opa"].kill()
    status, _, echo = await post(stack.url, body={**COMPLETION, "prompt": "fresh"}, headers={"x-api-key": ACME_KEY})
    assert status == 200, echo
    assert echo["headers"]["x-kernelgate-tenant"] == "acme"
    assert stack.decisions()[-1]["reason"] == "fail_open"


async def test_sidecar_down_means_no_request_passes(stack: AuthzStack) -> None:
    stack.procs["sidecar"].kill()
    before = await upstream_count(stack)
    status, _, _ = await post(stack.url, headers={"x-api-key": ACME_KEY})
    assert status == 503
    assert await upstream_count(stack) == before


# --- Redis: one budget for many replicas -------------------------------------------------------
async def test_redis_budget_is_shared_by_two_sidecars(make_stack, redis_url) -> None:
    stack = make_stack(redis_url=redis_url)
    set_limits(stack, "free", requests=4, tokens=100000)
    stack.start()
    # a second sidecar process and a second Envoy, same Redis, same OPA
    twin = make_stack(redis_url=redis_url)
    twin.opa_port = stack.opa_port
    twin.start_sidecar()
    twin.start_envoy()
    twin.procs["upstream"] = procs.start("upstream", [sys.executable, "-m", "tests.echo_upstream",
                                                      str(twin.upstream_port)], twin.logs)
    procs.wait_tcp(twin.upstream_port, proc=twin.procs["upstream"])
    statuses = []
    for i in range(6):
        target = stack if i % 2 == 0 else twin
        statuses.append((await post(target.url, headers={"x-api-key": GLOBEX_KEY}))[0])
    assert statuses == [200, 200, 200, 200, 429, 429]


# --- reload under load ---------------------------------------------------------------------
async def test_reload_keys_and_policy_under_load_without_a_failed_request(make_stack) -> None:
    import yaml

    from sidecar.identity import hash_api_key

    stack = make_stack()
    set_limits(stack, "pro", requests=10**6, tokens=10**9)
    stack.start()

    new_key = "kg-test-new-tenant-key-42"
    stop = asyncio.Event()
    results: list[int] = []

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(stack.url + "/v1/completions", json=COMPLETION,
                                        headers={"x-api-key": ACME_KEY}) as resp:
                    await resp.read()
                    results.append(resp.status)

    workers = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.5)
    keys = yaml.safe_load(stack.keys_file.read_text())
    keys[hash_api_key(new_key)] = {"tenant": "hooli", "tier": "free", "scopes": ["*"], "name": "new"}
    stack.keys_file.write_text(yaml.safe_dump(keys))
    data_file = stack.policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["kernelgate"]["models"]["brand-new-model"] = {"kind": "generate"}
    data_file.write_text(json.dumps(data))
    deadline = time.monotonic() + 10
    new_key_status = new_model_status = 0
    while time.monotonic() < deadline and (new_key_status, new_model_status) != (200, 200):
        await asyncio.sleep(0.2)
        new_key_status = (await post(stack.url, headers={"x-api-key": new_key}))[0]
        new_model_status = (await post(stack.url, body={**COMPLETION, "model": "brand-new-model"},
                                       headers={"x-api-key": ACME_KEY}))[0]
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    assert (new_key_status, new_model_status) == (200, 200)
    assert len(results) > 20
    assert set(results) == {200}, f"failed requests during reload: {sorted(set(results))}"


async def test_envoy_drain_lets_in_flight_requests_finish(stack: AuthzStack) -> None:
    from kernelgate.envoy_admin import active_requests, drain

    admin = f"http://127.0.0.1:{stack.admin_port}"
    slow = asyncio.ensure_future(post(stack.url, headers={"x-api-key": ACME_KEY}, path="/v1/completions?sleep=1.5"))
    for _ in range(50):
        if active_requests(admin):
            break
        await asyncio.sleep(0.05)
    assert active_requests(admin) == 1
    drained = await asyncio.to_thread(drain, admin, 10)
    assert drained
    status, _, echo = await slow
    assert status == 200 and echo["path"] == "/v1/completions?sleep=1.5"


async def test_policy_with_an_impossible_budget_fails_closed(make_stack) -> None:
    stack = make_stack()
    set_limits(stack, "free", requests=0, tokens=1000)  # a policy bug must not mean "no limit"
    stack.start()
    before = await upstream_count(stack)
    status, headers, payload = await post(stack.url, headers={"x-api-key": GLOBEX_KEY})
    assert (status, payload["error"]["code"]) == (503, "invalid_rate_limit")
    assert headers["retry-after"] == "1"
    assert await upstream_count(stack) == before


async def test_redis_down_with_failure_mode_deny_is_503(make_stack, redis_server, redis_url) -> None:
    stack = make_stack(redis_url=redis_url, authz_overrides={"ratelimit": {"redis_failure_mode": "deny"}})
    stack.start()
    assert (await post(stack.url, headers={"x-api-key": ACME_KEY}))[0] == 200
    redis_server.kill()
    status, headers, payload = await post(stack.url, headers={"x-api-key": ACME_KEY})
    assert (status, payload["error"]["code"]) == (503, "ratelimit_unavailable")
    assert headers["retry-after"] == "1"
