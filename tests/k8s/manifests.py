"""Reading k8s/ for the API-server tests: overlays rendered by the real kustomize, moved into a
namespace of their own, and looked up by kind and name (kustomize's hash suffix allowed).
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from common.processes import ROOT, find_binary

K8S = ROOT / "k8s"
OVERLAYS = ("cpu-dev", "gpu")


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([find_binary("kustomize"), "build", str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def in_namespace(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The overlay with its Namespace renamed and every namespaced object moved into it, so
    both overlays (which name the same objects) can live on one API server side by side."""
    moved = copy.deepcopy(docs)
    for doc in moved:
        if doc["kind"] == "Namespace":
            doc["metadata"]["name"] = namespace
        elif "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = namespace
    return moved


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of that kind whose name is ``name`` or ``name`` plus kustomize's hash suffix."""
    pattern = re.compile(rf"{name}(-[a-z0-9]{{10}})?")
    matches = [d for d in docs if d["kind"] == kind and pattern.fullmatch(d["metadata"]["name"])]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def selector(match_labels: dict[str, str]) -> str:
    """A ``matchLabels`` map as a label-selector query string."""
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
