"""Errors of the model lifecycle, shared by the registry and the HTTP layers (no torch, no HTTP)."""

from __future__ import annotations


class LifecycleError(Exception):
    """Base: a lifecycle call that cannot be done; ``status`` is the HTTP status that says why."""

    status = 400
    code = "invalid_request"


class UnknownModel(LifecycleError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model '{model}' does not exist")


class UnknownVersion(LifecycleError):
    status = 404
    code = "version_not_found"


class VersionConflict(LifecycleError):
    """The version exists already, or is in a state that forbids the call (activate before validation, ...)."""

    status = 409
    code = "version_conflict"


class InsufficientMemory(LifecycleError):
    """The version's estimated weights + KV cache do not fit in the free memory of its device."""

    status = 507
    code = "insufficient_memory"


class ModelNotReady(LifecycleError):
    status = 503
    code = "not_ready"
