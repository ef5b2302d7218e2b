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
        return {**asdict(self), "capacity": self.capacity, "saturated": self.saturated}

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
        return cls(**values)
