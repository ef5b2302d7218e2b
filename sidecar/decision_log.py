"""One structured JSON line per decision (``kind: decision``) and per settlement of its token
reservation (``kind: settlement``), joined by ``decision_id``.

Only what an operator needs to audit a decision goes in: ids, tenant, method, path
without its query string, outcome and why. Headers, bodies, keys and tokens never
do, so there is nothing to redact after the fact.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from sidecar.config import DecisionLogConfig


@dataclass(frozen=True)
class DecisionRecord:
    decision_id: str
    request_id: str
    tenant: str | None
    identity_method: str
    method: str
    path: str
    outcome: str  # "allow" | "deny"
    http_status: int
    reason: str
    latency_ms: float
    cache_hit: bool
    policy_revision: str
    shadow_denied: bool = False
    rate_limit: dict[str, Any] = field(default_factory=dict)
    # Who vouched for the caller (token issuer, introspection endpoint, client CA); None for API keys.
    identity_issuer: str | None = None
    # The model the request was routed to and the version the policy picked (canary), when it did.
    model: str | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class SettlementRecord:
    """A reservation closed: settled to the reported usage, or expired at its reserved amount."""

    decision_id: str
    tenant: str
    outcome: str  # "settled" | "expired"
    ending: str  # how the response ended ("stop", "length", "disconnect", ...) or "unreported"
    prompt_tokens: int | None
    completion_tokens: int | None
    reserved: int  # budget units taken at admission
    charged: int  # what the budget keeps
    refunded: int
    backend: str


class DecisionLogger:
    def __init__(self, config: DecisionLogConfig, stream: TextIO | None = None):
        self._enabled = config.enabled
        self._owned = False
        if stream is not None:
            self._stream = stream
        elif config.output_file == "-":
            self._stream = sys.stdout
        else:
            self._stream = open(config.output_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True

    @property
    def enabled(self) -> bool:
        """False: ``write`` drops every record (callers may skip building them)."""
        return self._enabled

    def write(self, record: DecisionRecord | SettlementRecord) -> None:
        if not self._enabled:
            return
        # the fields in order, as asdict() gives them without its deep copy (~30 us a line): the values
        # are plain JSON already and json.dumps only reads them
        line = dict(vars(record))
        line["ts"] = round(time.time(), 6)
        line["kind"] = "settlement" if isinstance(record, SettlementRecord) else "decision"
        self._stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
