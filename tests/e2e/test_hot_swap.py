"""A hot swap through Envoy: an open loop of completions while a new version is loaded, validated
and activated on the real inference server; nothing fails and each answer names one version."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.replica_stack import Replica, ReplicaStack, open_loop
from tests.procs import free_port

TOKEN = "e2e-admin-token"


@dataclass
class VersionedReplica(Replica):
    """A replica with the model admin API on ``admin_port`` (token in ``token_file``)."""

    admin_port: int = 0
    token_file: str = ""

    def inference_config(self) -> dict[str, Any]:
        config = super().inference_config()
        config["admin"] = {"port": self.admin_port, "token_file": self.token_file}
        return config


def admin_call(replica: VersionedReplica, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{replica.admin_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def test_swap_under_open_loop_through_envoy(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    replica = VersionedReplica("r0", max_batch_size=4, admin_port=free_port(), token_file=str(token))
    stack = ReplicaStack(tmp_path, replicas=[replica]).start()
    try:
        body = {"model": "tiny-gpt2", "prompt": "swap me", "max_tokens": 6, "temperature": 0}
        activated_at: list[float] = []

        async def swap() -> None:
            await asyncio.sleep(2.0)
            loop = asyncio.get_running_loop()
            status, loaded = await loop.run_in_executor(None, admin_call, replica, "POST",
                                                        "/admin/models/tiny-gpt2/versions",
                                                        {"version": "v2", "random_config": "tiny-gpt2", "seed": 0,
                                                         "activate": True})
            assert status == 202, loaded
            while True:
                _, listing = await loop.run_in_executor(None, admin_call, replica, "GET", "/admin/models")
                v2 = next(v for v in listing["models"][0]["versions"] if v["version"] == "v2")
                if v2["state"] not in ("loading", "validating", "ready"):
                    break
                await asyncio.sleep(0.05)
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
