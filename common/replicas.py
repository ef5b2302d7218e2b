"""What the inference replicas, Envoy and the sidecar agree on about replicas (names and one JSON shape).

In: nothing (constants and a parser). Out: the header names Envoy's retry policy and the
server share (the span attribute naming the replica is otel.names.REPLICA_ID), and
:class:`LoadReport`, the small
JSON document each replica serves at ``LOAD_PATH`` and the sidecar polls to learn
saturation. Imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Set by the server on a refusal it answered before any work started (queue full, not ready,
# shutting down): Envoy retries exactly those on another replica (retry_on retriable-headers).
NOT_STARTED_HEADER = "x-kernelgate-not-started"
# The replica that answered, on every response of the inference server.
REPLICA_HEADER = "x-kernelgate-replica"
# The load document of one replica (GET).
LOAD_PATH = "/load"


@dataclass(frozen=True)
class LoadReport:
    """One replica's load: which model it serves and whether it has room for another request.

    ``saturated``: batch and waiting queue are both full, so a new request would be refused
    with 429 queue_full. ``ready`` is false while the model loads, after a failure and while
    the server drains.
    """

    replica: str
    model: str
    ready: bool
    running: int
    waiting: int
    max_batch_size: int
    max_queue: int
    # The replica's other models (#15: several models per server), one report each, in the same
    # shape without ``models``; the fields above are the first model's.
    models: tuple[LoadReport, ...] = ()
    # Versions of this model the server rolled back (a failing canary, #15): the sidecar sets
    # their rollout weight to 0 in the policy's data.
    rolled_back: tuple[str, ...] = ()

    def per_model(self) -> tuple[LoadReport, ...]:
        """One report per model the replica serves, the first model's first."""
        return (self, *self.models)

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def saturated(self) -> bool:
        return self.running + self.waiting >= self.capacity

    @property
    def has_room(self) -> bool:
        return self.ready and not self.saturated

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "capacity": self.capacity, "saturated": self.saturated}
        out["models"] = [m.to_json() for m in self.models]
        out["rolled_back"] = list(self.rolled_back)
        return out

    @classmethod
    def from_json(cls, data: Any) -> "LoadReport":
        """Parse a replica's document; ValueError says which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"load report must be a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, kind in (("replica", str), ("model", str), ("ready", bool), ("running", int),
                           ("waiting", int), ("max_batch_size", int), ("max_queue", int)):
            value = data.get(name)
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
                raise ValueError(f"load report field '{name}' must be a {'non-negative integer' if kind is int else kind.__name__}, got {value!r}")
            values[name] = value
        others = data.get("models", [])
        if not isinstance(others, list):
            raise ValueError(f"load report field 'models' must be a list, got {others!r}")
        nested = []
        for index, other in enumerate(others):
            if not isinstance(other, dict):
                raise ValueError(f"load report field 'models[{index}]' must be a JSON object, got {other!r}")
            try:
                nested.append(cls.from_json({**other, "models": []}))
            except ValueError as exc:
                raise ValueError(f"load report field 'models[{index}]': {exc}") from None
        rolled_back = data.get("rolled_back", [])
        if not isinstance(rolled_back, list) or not all(isinstance(v, str) for v in rolled_back):
            raise ValueError(f"load report field 'rolled_back' must be a list of versions, got {rolled_back!r}")
        return cls(**values, models=tuple(nested), rolled_back=tuple(rolled_back))
