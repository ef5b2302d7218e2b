"""The HTTP routes of the pod: the one list every other list is checked against.

Clients reach the inference server only through Envoy, and the policy
(``policies/authz.rego``, its ``_routes`` table) decides on each of ``ROUTES``: a public
route (probes) is allowed with no identity, the others need the route's credential
``scope``; a route with a model ``kind`` runs a model, so the policy also checks its body
(model, kind, max_tokens, size) and the inference server refuses it while draining.
``LOCAL_ROUTES`` are served on the pod's loopback/pod IP only (Prometheus scrapes), never
through Envoy: the policy answers 404 for them.

Checked against this module by tests (a fourth list is a bug):
- ``tests/common/test_routes.py``: the policy's ``_routes`` table (through ``opa eval``), the routes
  the inference server's aiohttp app registers, and the HTTP probe paths of ``k8s/base``.
- ``k8s/base/policies/authz.rego`` is a copy of the policy (``scripts/render-k8s.sh``,
  checked by the k8s tests).

A new endpoint: add it here, in the policy's table, and in the inference server; the tests
name whichever is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.replicas import LOAD_PATH

ModelKind = Literal["generate", "embed"]


@dataclass(frozen=True)
class Route:
    id: str
    path: str
    methods: tuple[str, ...]
    # Scope the caller's credentials must carry; None on public routes.
    scope: str | None = None
    # The kind of model the route runs ("generate", "embed"), or None when it runs none.
    kind: ModelKind | None = None
    # Allowed with no identity and no budget (health probes).
    public: bool = False
    # "requests": the route runs no model, so only the request budget applies (no token budget).
    budget: Literal["requests"] | None = None

    def __post_init__(self) -> None:
        if self.public == (self.scope is not None):
            raise ValueError(f"route {self.id}: a route is public or needs a scope, not both or neither")
        if not self.path.startswith("/") or self.path.endswith("/"):
            raise ValueError(f"route {self.id}: path must start and not end with '/'")

    @property
    def segments(self) -> list[str]:
        """The path as the policy compares it (``input.parsed_path``)."""
        return self.path.strip("/").split("/")

    def policy_entry(self) -> dict[str, Any]:
        """This route as a row of the policy's ``_routes`` table."""
        entry: dict[str, Any] = {"id": self.id, "path": self.segments, "methods": list(self.methods)}
        if self.public:
            entry["public"] = True
        if self.scope is not None:
            entry["scope"] = self.scope
        if self.kind is not None:
            entry["kind"] = self.kind
        if self.budget is not None:
            entry["budget"] = self.budget
        return entry


# Through Envoy, decided by the policy.
ROUTES: tuple[Route, ...] = (
    Route("healthz", "/healthz", ("GET",), public=True),
    Route("readyz", "/readyz", ("GET",), public=True),
    Route("completions", "/v1/completions", ("POST",), scope="completions", kind="generate"),
    Route("chat", "/v1/chat/completions", ("POST",), scope="completions", kind="generate"),
    Route("embeddings", "/v1/embeddings", ("POST",), scope="embeddings", kind="embed"),
    Route("models", "/v1/models", ("GET",), scope="models", budget="requests"),
    # The served model's own count of a prompt (chat template included); the sidecar prices
    # token reservations with it (on loopback), clients may use it as vLLM's /tokenize.
    Route("tokenize", "/tokenize", ("POST",), scope="completions", budget="requests"),
)

# Served by the inference server inside the pod only; through Envoy the policy answers 404.
LOCAL_ROUTES: tuple[Route, ...] = (
    Route("metrics", "/metrics", ("GET",), public=True),
    # A replica's load report, polled by the sidecars (common.replicas.LoadReport).
    Route("load", LOAD_PATH, ("GET",), public=True),
)

# Routes that run a model: the policy checks their body, the inference server drains them.
MODEL_PATHS: frozenset[str] = frozenset(r.path for r in ROUTES if r.kind is not None)
