"""Token budgets through the whole pod on loopback: Envoy -> sidecar (+ OPA) -> inference server on
CPU, with the in-memory and the Redis backend. What the budget keeps must equal what the server
reported it spent, for plain and streamed responses, stop sequences, rejected requests and client
disconnects; 64 concurrent requests never take more than the budget; a server killed mid-stream
leaves no reservation behind once it expires; a stream cut by mid-stream enforcement is a valid SSE
stream ending with the usage chunk. Every route the server exposes is reachable with the right key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.stack import ACME_KEY, GLOBEX_KEY, AuthzStack

pytestmark = pytest.mark.timeout(600)

KEY = {"x-api-key": ACME_KEY, "content-type": "application/json"}
DAY_BUDGET = 100_000


def set_tier_limits(stack: AuthzStack, tier: str, limits: dict[str, Any]) -> None:
    data_file = stack.policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["kernelgate"]["tiers"][tier]["limits"] = limits
    data_file.write_text(json.dumps(data))


@pytest.fixture(params=["memory", "redis"])
def make_stack(request, tmp_path: Path) -> Iterator:
    stacks: list[AuthzStack] = []

    def factory(limits: dict[str, Any], **authz: Any) -> AuthzStack:
        redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
        stack = AuthzStack(tmp_path / f"stack{len(stacks)}", redis_url=redis_url, inference=True,
                           authz_overrides=authz)
        stack.workdir.mkdir(exist_ok=True)
        set_tier_limits(stack, "pro", limits)
        stacks.append(stack)
        return stack.start()

    yield factory
    for stack in stacks:
        stack.stop()


async def completion(session: aiohttp.ClientSession, stack: AuthzStack, body: dict[str, Any],
                     path: str = "/v1/completions") -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.post(stack.url + path, json=body, headers=KEY) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"_text": text}  # Envoy's own 503 when the upstream is gone
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, payload


async def sse(session: aiohttp.ClientSession, stack: AuthzStack, body: dict[str, Any], path: str = "/v1/completions",
              stop_after: int | None = None) -> tuple[int, list[str]]:
    """The raw ``data:`` payloads of a stream, in order (``stop_after``: hang up after that many)."""
    events: list[str] = []
    async with session.post(stack.url + path, json={**body, "stream": True}, headers=KEY) as resp:
        buffer = b""
        async for piece in resp.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                assert event.startswith(b"data: "), event
                events.append(event[len(b"data: "):].decode())
                if stop_after is not None and len(events) >= stop_after:
                    resp.close()  # the client vanishes mid-stream
                    return resp.status, events
        assert buffer == b"", f"stream ended inside an event: {buffer!r}"
        return resp.status, events


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def sidecar_metrics(stack: AuthzStack) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{stack.metrics_port}/metrics") as resp:
            return await resp.text()


async def test_budget_keeps_exactly_the_reported_usage(make_stack) -> None:
    stack = make_stack({"requests": 100_000, "tokens": DAY_BUDGET, "unit": "day"})
    seen: dict[str, dict[str, int]] = {}  # decision id -> usage the client saw
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        greedy = {"model": "tiny-gpt2", "temperature": 0}
        # a probe tells which text greedy decoding produces, so a stop sequence can end it early (the
        # random weights decide the text: the first prompt whose output has a usable one is taken)
        stops: list[str] = []
        for prompt in ("The pod", "Budgets", "A token is a token", "count me", "Streams count too"):
            status, _, probe = await completion(session, stack, {**greedy, "prompt": prompt, "max_tokens": 24})
            assert status == 200, probe
            text = probe["choices"][0]["text"]
            stops = [text[i:i + 2] for i in range(6, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in
                     text[i:i + 2]]
            if stops:
                break
        assert stops, "no probe prompt's greedy output has a usable stop sequence"
        stop = stops[0]
        bodies = [
            {**greedy, "prompt": prompt, "max_tokens": 300},  # long allowance, output ends by stop below
            {**greedy, "prompt": prompt, "max_tokens": 300, "stop": [stop]},
            {**greedy, "prompt": "Budgets are exact", "max_tokens": 40, "ignore_eos": True},
        ]
        for body in bodies:
            status, headers, payload = await completion(session, stack, body)
            assert status == 200, payload
            seen[(await decision_of(stack))] = payload["usage"]
        assert seen[list(seen)[1]]["completion_tokens"] < 300  # the stop sequence ended it early
        chat = {**greedy, "messages": [{"role": "user", "content": "count me exactly"}], "max_tokens": 200,
                "stop": [stop]}
        status, _, payload = await completion(session, stack, chat, "/v1/chat/completions")
        assert status == 200, payload
        seen[await decision_of(stack)] = payload["usage"]
        # streams: with include_usage the client sees the usage; without, the same greedy request
        # (so the same usage) must be charged the same even though the client never saw it
        stream_body = {**greedy, "prompt": "Streams count too", "max_tokens": 120, "stop": [stop]}
        status, events = await sse(session, stack, {**stream_body, "stream_options": {"include_usage": True}})
        assert status == 200 and events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        seen[await decision_of(stack)] = usage
        status, events = await sse(session, stack, stream_body)
        assert status == 200 and events[-1] == "[DONE]" and "usage" not in json.loads(events[-2])
        silent_stream = await decision_of(stack)
        # rejected by the server after admission: nothing was spent
        status, _, payload = await completion(session, stack, {**greedy, "prompt": "x", "max_tokens": 10,
                                                               "top_p": 0})
        assert status == 400, payload
        rejected = await decision_of(stack)
        # a client that hangs up mid-stream pays for what the engine generated, seen or not
        status, events = await sse(session, stack, {**greedy, "prompt": "Hang up", "max_tokens": 480,
                                                    "ignore_eos": True}, stop_after=3)
        disconnected = await decision_of(stack)

    allowed = {d["decision_id"]: d for d in stack.decisions() if d["outcome"] == "allow"}
    await wait_for(lambda: set(allowed) <= {s["decision_id"] for s in stack.settlements()}, what="settlements")
    settled = {s["decision_id"]: s for s in stack.settlements()}
    assert all(s["outcome"] == "settled" for s in settled.values())
    assert len(settled) == len(stack.settlements()), "each decision is settled once"
    for decision_id, usage in seen.items():
        s = settled[decision_id]
        assert (s["prompt_tokens"], s["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        # the reservation was priced with the server's own count of the prompt (chat template included)
        assert allowed[decision_id]["rate_limit"]["prompt_counted"] is True
        assert allowed[decision_id]["rate_limit"]["prompt_tokens"] == usage["prompt_tokens"]
    assert (settled[silent_stream]["prompt_tokens"], settled[silent_stream]["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert (settled[rejected]["charged"], settled[rejected]["ending"]) == (0, "rejected")
    assert settled[disconnected]["ending"] == "disconnect"
    assert 3 <= settled[disconnected]["completion_tokens"] < 480
    charged = sum(s["charged"] for s in settled.values())
    used = sum(s["prompt_tokens"] + s["completion_tokens"] for s in settled.values())
    assert charged == used  # overcharge 0
    assert sum(s["reserved"] for s in settled.values()) > charged  # the allowances were refunded

    text = await sidecar_metrics(stack)
    assert metric(text, "kernelgate_authz_tokens_total", tenant="acme", kind="charged") == charged
    assert metric(text, "kernelgate_authz_tokens_total", tenant="acme", kind="refunded") == sum(
        s["refunded"] for s in settled.values())
    # the headers of the next request show the budget after those settlements (less its own
    # reservation; a day's budget refills ~1.2 tokens a second meanwhile); budgets are per route,
    # so the chat request drew on its own
    on_route = sum(s["charged"] for d, s in settled.items() if allowed[d]["path"] == "/v1/completions")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await completion(session, stack, {"model": "tiny-gpt2", "prompt": "last",
                                                               "max_tokens": 1})
    assert status == 200
    floor = DAY_BUDGET - on_route - stack.decisions()[-1]["rate_limit"]["reserved"]
    assert floor <= int(headers["ratelimit-remaining"]) <= floor + (time.monotonic() - started) * DAY_BUDGET / 86400 + 1


async def decision_of(stack: AuthzStack) -> str:
    await wait_for(lambda: bool(stack.decisions()), what="a decision")
    return stack.decisions()[-1]["decision_id"]


async def test_64_concurrent_requests_never_take_more_than_the_budget(make_stack) -> None:
    budget = 1000
    # a slow Redis reply on this loaded machine must not send a request to the local fallback budget
    stack = make_stack({"requests": 100_000, "tokens": budget, "unit": "day"},
                       ratelimit={"redis_timeout_s": 10.0, "redis_failure_mode": "deny"})
    body = {"model": "tiny-gpt2", "prompt": "sixty-four at once", "max_tokens": 100, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(completion(session, stack, body) for _ in range(64)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    admitted = [payload["usage"] for status, _, payload in results if status == 200]
    cost = admitted[0]["prompt_tokens"] + 100  # ignore_eos: every admitted request uses all it reserved
    assert len(admitted) == budget // cost, (len(admitted), cost)
    await wait_for(lambda: len(stack.settlements()) == len(admitted), what="settlements")
    assert sum(s["charged"] for s in stack.settlements()) == len(admitted) * cost <= budget


async def test_server_killed_mid_stream_leaves_no_reservation_after_expiry(make_stack) -> None:
    stack = make_stack({"requests": 100_000, "tokens": DAY_BUDGET, "unit": "day", "concurrency": 1},
                       ratelimit={"reservation_ttl_s": 3.0})
    body = {"model": "tiny-gpt2", "prompt": "about to die", "max_tokens": 480, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", json={**body, "stream": True}, headers=KEY) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            stack.procs["upstream"].kill()
        victim = stack.decisions()[-1]["decision_id"]
        # the dead request still holds the tenant's only slot until its reservation expires
        status, _, payload = await completion(session, stack, body)
        assert status == 429 and "concurrency" in payload["error"]["message"]
        await wait_for(lambda: any(s["decision_id"] == victim for s in stack.settlements()), timeout=20,
                       what="expiry")
        expired = next(s for s in stack.settlements() if s["decision_id"] == victim)
        assert (expired["outcome"], expired["charged"], expired["refunded"]) == ("expired", expired["reserved"], 0)
        if stack.redis_url:
            import redis

            client = redis.Redis.from_url(stack.redis_url)
            assert client.zcard("kernelgate:rl:res:index") == 0
            assert [k for k in client.keys("kernelgate:rl:res:*") if k != b"kernelgate:rl:res:index"] == []
            assert all(client.zcard(k) == 0 for k in client.keys("kernelgate:rl:*concurrency"))
            client.close()
        # the slot is free again: admission lets the next request through (the server is gone: 503)
        status, _, _ = await completion(session, stack, body)
        assert status == 503
        assert stack.decisions()[-1]["outcome"] == "allow"


async def test_midstream_enforcement_ends_the_stream_cleanly_with_usage(make_stack) -> None:
    budget = 200
    stack = make_stack({"requests": 100_000, "tokens": budget, "unit": "day", "enforce_midstream": True})
    body = {"model": "tiny-gpt2", "prompt": "longer than the budget", "max_tokens": 480, "ignore_eos": True,
            "temperature": 0}
    async with aiohttp.ClientSession() as session:
        status, events = await sse(session, stack, body)  # no include_usage asked: it comes anyway
        assert status == 200
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [c["choices"][0]["finish_reason"] for c in finishing] == ["length"]
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and chunks.index(finishing[0]) == len(chunks) - 2
        granted = stack.decisions()[-1]["rate_limit"]["max_tokens"]
        assert usage["completion_tokens"] == granted == budget - usage["prompt_tokens"]
        # the budget is spent: the next one is refused before the GPU works
        status, _, payload = await completion(session, stack, {**body, "max_tokens": 5})
        assert status == 429, payload
    await wait_for(lambda: len(stack.settlements()) == 1, what="settlement")
    assert stack.settlements()[0]["charged"] == budget


async def test_every_route_the_server_exposes_is_reachable(make_stack) -> None:
    """Each route of common/routes.py answers through Envoy with the right key (the policy allows it and
    the server itself answers); routes local to the pod (Prometheus' /metrics) are not exposed."""
    from common.routes import LOCAL_ROUTES, ROUTES

    stack = make_stack({"requests": 100_000, "tokens": DAY_BUDGET, "unit": "day"})
    bodies = {
        "/v1/completions": {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 2},
        "/v1/embeddings": {"model": "all-minilm-l6-v2", "input": "hi"},
        "/tokenize": {"model": "tiny-gpt2", "prompt": "abc"},
    }
    async with aiohttp.ClientSession() as session:
        for route in ROUTES:
            for method in route.methods:
                async with session.request(method, stack.url + route.path, json=bodies.get(route.path),
                                           headers=KEY) as resp:
                    text = await resp.text()
                    # embeddings: this server runs no encoder and says so itself (the policy let it through)
                    want = 404 if route.path == "/v1/embeddings" else 200
                    assert resp.status == want, (method, route.path, resp.status, text)
                    if not route.public:
                        assert stack.decisions()[-1]["outcome"] == "allow", route.path
                    if route.path == "/tokenize":
                        assert json.loads(text)["count"] == 3  # the demo tokenizer: one token a byte
        for route in LOCAL_ROUTES:
            async with session.get(stack.url + route.path, headers=KEY) as resp:
                assert resp.status == 404, route.path
        async with session.get(stack.url + "/v1/models", headers={"x-api-key": GLOBEX_KEY}) as resp:
            assert resp.status == 200  # globex has the "models" scope (was 503 invalid_rate_limit)
            assert {m["id"] for m in (await resp.json())["data"]} == {"tiny-gpt2"}
