"""Rolled-back canaries reach the policy's data (sidecar/rollouts.py) on a real OPA: their weight
goes to 0 for the model and every tenant, once per rollback, and an OPA that is down is tried again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import OpaConfig
from sidecar.metrics import SidecarMetrics
from sidecar.opa import OpaPolicyClient
from sidecar.rollouts import RollbackWriter, zero_weight_patches
from tests import procs
from tests.procs import free_port

ROLLOUT = {"weights": {"v1": 50, "v2": 50}, "tenants": {"acme": {"v1": 10, "v2": 90}, "a/b": {"v2": 1},
                                                         "globex": {"v1": 1}}}


@pytest.fixture
def opa(tmp_path: Path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "authz.rego").write_text("package envoy.authz\n\nresult := {\"allowed\": true}\n")
    (tmp_path / "p" / "data.json").write_text(json.dumps({"kernelgate": {"rollouts": {"chat": ROLLOUT}}}))
    proc = procs.start_opa(tmp_path / "logs", tmp_path / "p")
    yield proc
    proc.stop()


def test_patches_touch_only_weights_above_zero() -> None:
    assert zero_weight_patches(ROLLOUT, "v2") == [
        {"op": "replace", "path": "/weights/v2", "value": 0},
        {"op": "replace", "path": "/tenants/a~1b/v2", "value": 0},
        {"op": "replace", "path": "/tenants/acme/v2", "value": 0}]
    assert zero_weight_patches(ROLLOUT, "v9") == []
    assert zero_weight_patches(None, "v2") == [] and zero_weight_patches({"weights": "x"}, "v2") == []


async def test_a_rollback_sets_the_weight_to_zero_once(opa) -> None:
    client = OpaPolicyClient(OpaConfig(url=f"http://127.0.0.1:{opa.ports['port']}"))
    metrics = SidecarMetrics(CollectorRegistry())
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)

    writer = RollbackWriter(client, metrics.canary_rollbacks, refresh)
    try:
        await writer.apply([("chat", "v2")])
        data = await client.read_data("kernelgate/rollouts/chat")
        assert data == {"weights": {"v1": 50, "v2": 0},
                        "tenants": {"acme": {"v1": 10, "v2": 0}, "a/b": {"v2": 0}, "globex": {"v1": 1}}}
        assert refreshed == [1]
        await writer.apply([("chat", "v2")])  # still reported: nothing more to do
        assert metrics.canary_rollbacks.labels("chat", "v2")._value.get() == 1
        # An operator raises the weight again while the replica still reports the rollback: it stays
        # written (the writer does not fight the operator), until the version leaves the reports.
        await client.patch_data("kernelgate/rollouts/chat", [{"op": "replace", "path": "/weights/v2", "value": 5}])
        await writer.apply([("chat", "v2")])
        assert (await client.read_data("kernelgate/rollouts/chat"))["weights"]["v2"] == 5
        await writer.apply([])
        await writer.apply([("chat", "v2")])  # rolled back again (a new version under the same name)
        assert (await client.read_data("kernelgate/rollouts/chat"))["weights"]["v2"] == 0
        assert metrics.canary_rollbacks.labels("chat", "v2")._value.get() == 2
        # A model without a rollout document: nothing to write, counted, no error.
        await writer.apply([("chat", "v2"), ("other", "v1")])
        assert metrics.canary_rollbacks.labels("other", "v1")._value.get() == 1
    finally:
        await client.close()


async def test_opa_down_is_tried_again_at_the_next_poll(tmp_path: Path) -> None:
    port = free_port()
    client = OpaPolicyClient(OpaConfig(url=f"http://127.0.0.1:{port}"))
    metrics = SidecarMetrics(CollectorRegistry())
    writer = RollbackWriter(client, metrics.canary_rollbacks)
    await writer.apply([("chat", "v2")])  # nothing listens yet
    assert metrics.canary_rollbacks.labels("chat", "v2")._value.get() == 0
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "data.json").write_text(json.dumps({"kernelgate": {"rollouts": {"chat": ROLLOUT}}}))
    proc = procs.start_opa(tmp_path / "logs", tmp_path / "p", port=port)
    try:
        await writer.apply([("chat", "v2")])
        assert (await client.read_data("kernelgate/rollouts/chat"))["weights"]["v2"] == 0
        assert metrics.canary_rollbacks.labels("chat", "v2")._value.get() == 1
    finally:
        await client.close()
        proc.stop()
