"""A hot swap through Envoy: an open loop of completions while a new version is loaded, validated
and activated on the real inference server; nothing fails and each answer names one version."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.model_stack import VersionedReplica, load_and_activate
from tests.procs import free_port
from tests.replica_stack import ReplicaStack, open_loop

TOKEN = "e2e-admin-token"


async def test_swap_under_open_loop_through_envoy(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    replica = VersionedReplica("r0", max_batch_size=4, admin_port=free_port(), token_file=str(token), token=TOKEN)
    stack = ReplicaStack(tmp_path, replicas=[replica]).start()
    try:
        body = {"model": "tiny-gpt2", "prompt": "swap me", "max_tokens": 6, "temperature": 0}
        activated_at: list[float] = []

        async def swap() -> None:
            await asyncio.sleep(2.0)
            loop = asyncio.get_running_loop()
            v2 = await loop.run_in_executor(None, load_and_activate, replica, "tiny-gpt2",
                                            {"version": "v2", "random_config": "tiny-gpt2", "seed": 0})
            assert v2["state"] == "active", v2
            activated_at.append(loop.time())

        t0 = asyncio.get_running_loop().time()
        outcomes, _ = await asyncio.gather(open_loop(stack.url, body, rate=8, duration_s=10), swap())
        switch = activated_at[0] - t0
    finally:
        stack.stop()
    failed = [o for o in outcomes if o.kind != "ok"]
    assert not failed, failed[:5]
    assert {o.version for o in outcomes} == {"v1", "v2"}, {o.version for o in outcomes}
    # Requests sent a second after activation (plenty for those in flight to finish) all answer from v2.
    late = [o for o in outcomes if o.sent_at > switch + 1.0]
    assert late and all(o.version == "v2" for o in late)
    early = [o for o in outcomes if o.sent_at < 1.5]
    assert early and all(o.version == "v1" for o in early)
