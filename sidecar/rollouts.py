"""Canary rollbacks the inference servers decided, written into the policy's rollout weights.

In: the ``(model, version)`` pairs the replicas' load reports name as rolled back
(``common.replicas.LoadReport.rolled_back``, read by ``sidecar.replicas.ReplicaWatcher`` at
every poll). Out: for each pair newly seen, its weight set to 0 in OPA's data —
``data.kernelgate.rollouts[model].weights[version]`` and the same version in every tenant's
weights — with one JSON Patch through OPA's data API, then an immediate revision refresh (the
decision cache empties, so the next check already routes around it); a warning in the log
and ``kernelgate_authz_canary_rollbacks_total{model,version}``. A write that fails (OPA
down) is tried again at the next poll. A pair that leaves the reports (the version was
unloaded) is forgotten, so a later rollback of the same name is written again.

The server stops serving a rolled-back version at once by itself (requests naming it go to
the active version), so the time this write takes costs no failed requests; it makes the
policy's data say what is true. In ``opa.mode: wasm`` there is no data API: the bundle
keeps its weights (logged once) and the server's own fallback is what holds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from prometheus_client import Counter

log = logging.getLogger("kernelgate.authz.rollouts")

ROLLOUTS_PATH = "kernelgate/rollouts"  # data.kernelgate.rollouts, read by policies/authz.rego


class PolicyData(Protocol):
    """OPA's data API (``sidecar.opa.OpaPolicyClient``)."""

    async def read_data(self, path: str) -> Any: ...

    async def patch_data(self, path: str, patches: list[dict[str, Any]]) -> None: ...


def zero_weight_patches(rollout: Any, version: str) -> list[dict[str, Any]]:
    """JSON Patch operations (relative to the model's rollout document) setting ``version``'s
    weight to 0 wherever it is above 0: the model's weights and each tenant's."""
    if not isinstance(rollout, dict):
        return []
    places: list[tuple[str, Any]] = [("/weights", rollout.get("weights"))]
    tenants = rollout.get("tenants")
    if isinstance(tenants, dict):
        places += [(f"/tenants/{_pointer(tenant)}", weights) for tenant, weights in sorted(tenants.items())]
    return [{"op": "replace", "path": f"{prefix}/{_pointer(version)}", "value": 0}
            for prefix, weights in places
            if isinstance(weights, dict) and isinstance(weights.get(version), (int, float)) and weights[version] > 0]


def _pointer(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


class RollbackWriter:
    """Sets rolled-back canaries' weights to 0 in the policy's data (see the module docstring)."""

    def __init__(self, data: PolicyData | None, counter: Counter,
                 on_written: Callable[[], Awaitable[Any]] | None = None) -> None:
        self._data = data
        self._counter = counter
        self._on_written = on_written
        self._done: set[tuple[str, str]] = set()
        self._failing: set[tuple[str, str]] = set()  # warned once; retried quietly at every poll
        self._warned = False

    async def apply(self, rolled_back: Iterable[tuple[str, str]]) -> None:
        """The pairs every replica reports now; writes those not written yet."""
        current = set(rolled_back)
        self._done &= current
        self._failing &= current
        for model, version in sorted(current - self._done):
            if await self._write(model, version):
                self._done.add((model, version))

    async def _write(self, model: str, version: str) -> bool:
        if self._data is None:
            if not self._warned:
                log.warning("canary %s/%s rolled back by the inference server; opa.mode wasm has no data API, "
                            "so the bundle's rollout weights stay as they are", model, version)
                self._warned = True
            return True
        path = f"{ROLLOUTS_PATH}/{model}"
        try:
            patches = zero_weight_patches(await self._data.read_data(path), version)
            if patches:
                await self._data.patch_data(path, patches)
        except Exception as exc:  # noqa: BLE001 - OPA down or refusing: try again at the next poll
            if (model, version) not in self._failing:
                self._failing.add((model, version))
                log.warning("could not set the weight of rolled-back canary %s/%s to 0 in OPA's data (trying "
                            "again at every poll): %s", model, version, exc)
            return False
        self._failing.discard((model, version))
        self._counter.labels(model, version).inc()
        log.warning("canary %s/%s rolled back by the inference server: weight set to 0 in data.%s (%d places)",
                    model, version, path.replace("/", "."), len(patches))
        if patches and self._on_written is not None:
            await self._on_written()
        return True
