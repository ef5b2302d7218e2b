"""Inference replicas with the model admin API on, for lifecycle tests and ``bench/hot_swap.py``.

``VersionedReplica`` is a ``Replica`` (tests/replica_stack.py) whose server also listens on
``admin_port`` with the bearer token in ``token_file``; ``admin_call`` is one authenticated
call to it and ``load_and_activate`` loads a version with ``activate`` and waits until it is
active (or failed), returning the version's last status.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.replica_stack import Replica


@dataclass
class VersionedReplica(Replica):
    admin_port: int = 0
    token_file: str = ""
    token: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # more inference sections (rollback, ...)

    def inference_config(self) -> dict[str, Any]:
        config = super().inference_config()
        config["admin"] = {"port": self.admin_port, "token_file": self.token_file}
        return {**config, **self.overrides}


def admin_call(replica: VersionedReplica, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{replica.admin_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {replica.token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def load_version(replica: VersionedReplica, model: str, spec: dict[str, Any], timeout: float = 300) -> dict:
    """POST the version (not activated); poll until it is validated (ready) or failed."""
    status, loaded = admin_call(replica, "POST", f"/admin/models/{model}/versions", spec)
    if status != 202:
        raise AssertionError(f"load refused: {status} {loaded}")
    return wait_version(replica, model, spec["version"], ("ready", "failed"), timeout)


def version_status(replica: VersionedReplica, model: str, version: str) -> dict:
    _, listing = admin_call(replica, "GET", "/admin/models")
    [entry] = [m for m in listing["models"] if m["name"] == model]
    return next(v for v in entry["versions"] if v["version"] == version)


def wait_version(replica: VersionedReplica, model: str, version: str, states: tuple[str, ...],
                 timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = version_status(replica, model, version)
        if status["state"] in states:
            return status
        time.sleep(0.02)
    raise AssertionError(f"version {version} not in {states} after {timeout}s: {status}")


def load_and_activate(replica: VersionedReplica, model: str, spec: dict[str, Any], timeout: float = 300) -> dict:
    """POST the version with ``activate``; poll until it is active or failed (every 20 ms)."""
    status, loaded = admin_call(replica, "POST", f"/admin/models/{model}/versions", {**spec, "activate": True})
    if status != 202:
        raise AssertionError(f"load refused: {status} {loaded}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, listing = admin_call(replica, "GET", "/admin/models")
        [entry] = [m for m in listing["models"] if m["name"] == model]
        version = next(v for v in entry["versions"] if v["version"] == spec["version"])
        if version["state"] in ("active", "failed"):
            return version
        time.sleep(0.02)
    raise AssertionError(f"version {spec['version']} not active after {timeout}s")
