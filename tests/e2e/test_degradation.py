"""Every replica of a model saturated: the policy degrades as its data says (fallback model, or 429).

Two replicas of ``small-gpt2`` (one batch slot and one queue slot each) and one replica of the
fallback ``tiny-gpt2``, behind a real Envoy, sidecar and OPA. The sidecar learns saturation by
polling the replicas' load; the policy data chooses between the fallback and a fast 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import aiohttp
import pytest

from tests.replica_stack import Replica, ReplicaStack, send, wait_for, write_policy_data

BIG = "small-gpt2"
FALLBACK = "tiny-gpt2"
# Long enough to hold a slot for seconds on CPU.
HOLD = {"model": BIG, "prompt": "Hold", "max_tokens": 800, "ignore_eos": True, "temperature": 0}
ASK = {"model": BIG, "prompt": "Hello", "max_tokens": 4, "temperature": 0}


def degrade_to(action: str):
    def update(data: dict) -> None:
        data["kernelgate"]["models"][BIG] = {"kind": "generate", "on_saturation": {
            "action": action, "fallback": FALLBACK, "retry_after_s": 3}}
    return update


@pytest.fixture(scope="module")
def saturable(tmp_path_factory) -> Iterator[ReplicaStack]:
    workdir = tmp_path_factory.mktemp("degradation") / "stack"
    workdir.mkdir()
    replicas = [Replica(f"big{i}", model=BIG, random_config="small-gpt2", max_batch_size=1, max_queue=1)
                for i in range(2)]
    stack = ReplicaStack(workdir, replicas=replicas, others=[Replica("fallback0", model=FALLBACK)])
    write_policy_data(stack, degrade_to("fallback"))
    yield stack.start()
    stack.stop()


def saturated(stack: ReplicaStack) -> bool:
    return stack.sidecar_metric("kernelgate_model_saturated", model=BIG) == 1


@contextlib.asynccontextmanager
async def all_replicas_busy(stack: ReplicaStack):
    """Fill every slot of every ``BIG`` replica (2 running + 2 queued) until the block ends."""
    async with aiohttp.ClientSession() as session:
        holds = [asyncio.create_task(send(session, stack.url, HOLD)) for _ in range(4)]
        try:
            await asyncio.to_thread(wait_for, lambda: saturated(stack), 60, "the sidecar to see the model saturated")
            yield
        finally:
            for task in holds:
                task.cancel()
            await asyncio.gather(*holds, return_exceptions=True)


async def test_saturated_model_is_served_by_the_fallback_then_by_itself_again(saturable: ReplicaStack) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, text = await send(session, saturable.url, ASK)
        assert status == 200 and json.loads(text)["model"] == BIG, text
        assert "x-kernelgate-degraded" not in headers

        async with all_replicas_busy(saturable):
            status, headers, text = await send(session, saturable.url, ASK)
            assert status == 200, text
            assert json.loads(text)["model"] == FALLBACK, "the response names the model that served it"
            assert headers["x-kernelgate-degraded"] == "fallback"
            assert headers["x-kernelgate-served-model"] == FALLBACK
            assert headers["x-kernelgate-replica"] == "fallback0"

        # The held requests are gone: their slots free up and the model serves itself again.
        await asyncio.to_thread(wait_for, lambda: not saturated(saturable), 60, "saturation to clear")
        status, headers, text = await send(session, saturable.url, ASK)
        assert status == 200 and json.loads(text)["model"] == BIG, text
        assert headers["x-kernelgate-replica"] in {"big0", "big1"}


async def test_saturated_model_set_to_reject_answers_429_with_retry_after_at_once(saturable: ReplicaStack) -> None:
    write_policy_data(saturable, degrade_to("reject"))
    try:
        async with aiohttp.ClientSession() as session, all_replicas_busy(saturable):
            # OPA reloads the data within a moment; the answer follows the data, never a timeout.
            for _ in range(100):
                status, headers, text = await send(session, saturable.url, ASK)
                if status == 429:
                    break
                assert status == 200 and json.loads(text)["model"] == FALLBACK, text
                await asyncio.sleep(0.1)
            assert status == 429, text
            error = json.loads(text)["error"]
            assert error["code"] == "model_saturated" and error["type"] == "rate_limit_error"
            assert headers["retry-after"] == "3"
            assert "x-kernelgate-replica" not in headers, "refused by the policy, before any replica"
    finally:
        write_policy_data(saturable, degrade_to("fallback"))
