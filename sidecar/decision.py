"""Input document -> policy decision: cache first, else OPA.

The decision is OPA-Envoy's: a boolean, or an object ``{allowed, http_status, headers,
response_headers_to_add, request_headers_to_remove, body, dynamic_metadata}``;
kernelgate also reads ``reason`` and ``rate_limit``. Identical inputs (less the
fields that differ on every request) reuse a cached decision until its TTL ends or
the policy revision changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import strict_json
from sidecar.config import OpaConfig

log = logging.getLogger("kernelgate.decision")


class DecisionUnavailable(Exception):
    """OPA could not answer in time (down, slow, or an evaluation error)."""


class PolicyResultError(ValueError):
    """The policy returned something that is not a decision."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    http_status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    response_headers_to_add: Mapping[str, str] = field(default_factory=dict)
    request_headers_to_remove: tuple[str, ...] = ()
    body: str = ""
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    rate_limit: Mapping[str, Any] | None = None
    # How the decision was reached: "opa", "cache", "fail_open".
    source: str = "opa"
    revision: str = ""


def parse_result(result: Any, revision: str = "") -> Decision:
    """OPA's ``result`` (bool or object) -> Decision; anything else is an error, not a deny."""
    if isinstance(result, bool):
        return Decision(allowed=result, http_status=200 if result else 403,
                        reason="ok" if result else "denied", revision=revision)
    if not isinstance(result, Mapping):
        raise PolicyResultError(f"policy result must be a boolean or an object, got {type(result).__name__}")
    allowed = result.get("allowed")
    if not isinstance(allowed, bool):
        raise PolicyResultError("policy result has no boolean 'allowed'")
    status = result.get("http_status", 200 if allowed else 403)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise PolicyResultError(f"policy result has an invalid http_status {status!r}")
    body = result.get("body", "")
    if not isinstance(body, str):
        body = json.dumps(body)
    dynamic_metadata = result.get("dynamic_metadata") or {}
    if not isinstance(dynamic_metadata, Mapping):
        raise PolicyResultError("policy result field 'dynamic_metadata' must be an object")
    rate_limit = result.get("rate_limit")
    return Decision(
        allowed=allowed,
        http_status=status,
        headers=_string_map(result.get("headers"), "headers"),
        response_headers_to_add=_string_map(result.get("response_headers_to_add"), "response_headers_to_add"),
        request_headers_to_remove=tuple(str(h) for h in result.get("request_headers_to_remove") or ()),
        body=body,
        dynamic_metadata=dynamic_metadata,
        reason=str(result.get("reason") or ("ok" if allowed else "denied")),
        rate_limit=rate_limit if isinstance(rate_limit, Mapping) else None,
        revision=revision,
    )


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyResultError(f"policy result field '{name}' must be an object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def cache_key(document: Mapping[str, Any], ignore_headers: frozenset[str]) -> str:
    """Digest of what a policy may read: the input less per-request noise.

    Request id, trace headers and the client's source port differ on every request
    and no sane policy reads them; everything else (path, body, identity, other
    headers) is part of the key, so a cached decision is always the one OPA gave
    for an identical input.
    """
    http = document["attributes"]["request"]["http"]
    headers = {k: v for k, v in http["headers"].items() if k not in ignore_headers}
    stable_http = {k: v for k, v in http.items() if k not in ("id", "headers")}
    stable = {k: v for k, v in document.items() if k != "attributes"}
    attributes = {k: v for k, v in document["attributes"].items() if k not in ("request", "source")}
    source = document["attributes"].get("source", {}).get("address", {}).get("socketAddress", {})
    payload = strict_json.dumps([stable, attributes, stable_http, headers, source.get("address")], sort_keys=True)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class DecisionCache:
    """Bounded LRU of decisions with a TTL, emptied when the policy revision changes.

    An entry is a tuple of tuples, strings and numbers (expiry, the Decision's fields but
    ``source``, its maps as item tuples), not a Decision object: the cyclic GC untracks a tuple
    that holds only untracked values (it never does while a dict is in it), so a full cache adds
    nothing to the old generation every full collection walks. Holding 10 000 Decisions (two
    tracked objects each) made those collections take 20-100 ms on the 2-core VM: a stall of
    every check in flight. ``get`` builds the Decision back (fresh dicts), source "cache". A
    decision whose maps nest containers stays tracked: correct, only not exempt.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self.revision = ""

    def get(self, key: str) -> Decision | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[0] < self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        (_, allowed, status, headers, to_add, to_remove, body, metadata, reason, rate_limit, revision) = item
        return Decision(allowed, status, dict(headers), dict(to_add), to_remove, body, dict(metadata), reason,
                        dict(rate_limit) if rate_limit is not None else None, "cache", revision)

    def put(self, key: str, decision: Decision, revision: str) -> None:
        if self._max <= 0 or revision != self.revision:
            return  # a decision from an older revision must not outlive it
        d = decision
        self._entries[key] = (self._clock() + self._ttl, d.allowed, d.http_status, tuple(d.headers.items()),
                              tuple(d.response_headers_to_add.items()), d.request_headers_to_remove, d.body,
                              tuple(d.dynamic_metadata.items()), d.reason,
                              tuple(d.rate_limit.items()) if d.rate_limit is not None else None, d.revision)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def set_revision(self, revision: str) -> bool:
        """Returns True when the revision changed (and the cache was emptied)."""
        if revision == self.revision:
            return False
        self.revision = revision
        self._entries.clear()
        return True

    def __len__(self) -> int:
        return len(self._entries)


class PolicyClient(Protocol):
    # True: evaluate() runs to the end without yielding and enforces its own deadline (Wasm's
    # epoch interruption), so the Decider sets no asyncio timer around it.
    in_process: bool

    async def evaluate(self, document: Mapping[str, Any]) -> Any: ...
    async def revision(self) -> str: ...
    async def close(self) -> None: ...


class Decider:
    """Cache, then OPA with a deadline; failures become DecisionUnavailable."""

    def __init__(self, config: OpaConfig, client: PolicyClient, cache: DecisionCache):
        self._config = config
        self._client = client
        self._cache = cache
        self._ignore = frozenset(h.lower() for h in config.cache_ignore_headers)

    @property
    def revision(self) -> str:
        return self._cache.revision

    async def decide(self, document: Mapping[str, Any]) -> Decision:
        key = cache_key(document, self._ignore)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        revision = self._cache.revision
        try:
            if self._client.in_process:
                result = await self._client.evaluate(document)
            else:
                async with asyncio.timeout(self._config.timeout_s):
                    result = await self._client.evaluate(document)
        except TimeoutError:
            raise DecisionUnavailable(f"OPA did not answer within {self._config.timeout_s}s") from None
        except Exception as exc:  # noqa: BLE001 - any transport failure means "cannot decide"
            raise DecisionUnavailable(f"OPA query failed: {type(exc).__name__}: {exc}") from None
        if result is None:
            raise DecisionUnavailable(f"policy path '{self._config.policy_path}' is undefined")
        try:
            decision = parse_result(result, revision)
        except PolicyResultError as exc:
            raise DecisionUnavailable(str(exc)) from None
        self._cache.put(key, decision, revision)
        return decision

    async def warm_up(self) -> None:
        """Evaluate the policy once on an empty input, before any check: the client's first call
        (OPA: the HTTP session, the loopback connection, OPA's first compile of the query; Wasm:
        the instance) is paid here, not by the first check of a fresh process. Nothing is cached,
        counted or logged; errors propagate (the caller bounds and ignores them)."""
        await self._client.evaluate({})

    async def refresh_revision(self) -> bool:
        """Ask OPA for its policy/data revision; a change empties the cache."""
        revision = await self._client.revision()
        changed = self._cache.set_revision(revision)
        if changed:
            log.info("policy revision %s: decision cache emptied", revision[:12])
        return changed

    async def watch_revision(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh_revision()
            except Exception as exc:  # noqa: BLE001 - OPA down: keep polling, decisions fail on their own
                log.debug("revision poll failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), self._config.revision_poll_s)
            except TimeoutError:
                pass
