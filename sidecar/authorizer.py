"""One check, end to end: input -> identity -> decision -> rate limits -> response.

This module only strings the steps together and records what happened (decision
log, metrics, span attributes); each step lives in its own module. It knows
nothing of gRPC: ``server.py`` hands it a CheckRequest and sends back what it returns.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import propagate, trace

from otel import names

from sidecar import response
from sidecar.config import SidecarConfig
from sidecar.decision import Decider, Decision, DecisionUnavailable
from sidecar.decision_log import DecisionLogger, DecisionRecord
from sidecar.identity import AuthError, Authenticator, Identity
from sidecar.input import CheckInput, InputLimits, build_input, policy_document
from sidecar.metrics import SidecarMetrics
from sidecar.ratelimit import (
    RateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
    budgets_for,
    estimate_tokens,
    rate_limit_headers,
    upstream_rate_limit_headers,
)

log = logging.getLogger("kernelgate.authz")


class SaturationView(Protocol):
    """Which models no inference replica has room for (``sidecar.replicas.ReplicaWatcher``)."""

    def saturated_models(self) -> list[str]: ...


@dataclass(frozen=True)
class CheckResult:
    """What one check found, step by step (as opa-envoy-plugin's EvalResult): the response sent
    back and everything the decision log, the metrics and the span need. Built once, at the end."""

    decision_id: str
    response: Any
    outcome: str = "deny"  # "allow" | "deny"
    http_status: int = 403
    reason: str = ""
    input: CheckInput | None = None
    identity: Identity | None = None
    decision: Decision | None = None
    rate_limit: RateLimitResult | None = None

    @property
    def cache_hit(self) -> bool:
        return self.decision is not None and self.decision.source == "cache"

    @property
    def shadow_denied(self) -> bool:
        """Rate limits would have denied, but ``ratelimit.shadow`` let it through."""
        return self.outcome == "allow" and self.rate_limit is not None and not self.rate_limit.allowed

    def rate_limit_record(self) -> dict[str, Any]:
        r = self.rate_limit
        if r is None:
            return {}
        return {"backend": r.backend, "degraded": r.degraded,
                "budgets": {s.kind: {"limit": s.limit, "remaining": s.remaining} for s in r.states}}


class Refusal(Exception):
    """A step ends the check with this answer (401, the policy's deny, 429, 503)."""

    def __init__(self, http_status: int, reason: str, response: Any) -> None:
        super().__init__(reason)
        self.http_status, self.reason, self.response = http_status, reason, response


def _unavailable(reason: str, message: str) -> Refusal:
    """503 + Retry-After: the sidecar cannot decide right now (fail closed)."""
    return Refusal(503, reason, response.deny(
        503, response.error_body(message, "service_unavailable", reason), {"retry-after": "1"}))


class Authorizer:
    def __init__(self, config: SidecarConfig, authenticator: Authenticator, decider: Decider,
                 rate_limiter: RateLimiter | None, decision_log: DecisionLogger,
                 metrics: SidecarMetrics, tracer: trace.Tracer | None = None,
                 saturation: SaturationView | None = None):
        """``rate_limiter`` None: rate limits are off (``build_rate_limiter`` decides); ``saturation``
        None: the policy is told of no saturated model."""
        self._config = config
        self._authenticator = authenticator
        self._decider = decider
        self._rate_limiter = rate_limiter
        self._decision_log = decision_log
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer(names.SIDECAR_TRACER)
        self._saturation = saturation
        self._limits = InputLimits(max_body_bytes=config.max_body_bytes)
        self._prefix = config.header_prefix.lower()
        self._credential_headers = ("authorization", config.identity.api_key_header.lower())
        # Decision ids only need to be unique, not secret: a seeded PRNG costs ~1 us, where
        # uuid4() reads the kernel's CSPRNG (~20 us a check on this project's VMs).
        self._ids = random.Random()

    async def check(self, check_request: Any, call_metadata: Mapping[str, str] | None = None) -> Any:
        """``call_metadata``: the gRPC call's metadata, where Envoy puts its ext_authz span's context."""
        started = time.perf_counter()
        decision_id = f"{self._ids.getrandbits(128):032x}"
        headers = check_request.attributes.request.http.headers
        carrier = call_metadata if call_metadata and "traceparent" in call_metadata else dict(headers)
        with self._tracer.start_as_current_span(names.AUTHZ_CHECK_SPAN, context=propagate.extract(carrier),
                                                kind=trace.SpanKind.SERVER) as span:
            try:
                result = await self._evaluate(check_request, decision_id)
            except Exception:  # noqa: BLE001 - a bug must answer 500, never kill the stream
                log.exception("check failed unexpectedly (decision %s)", decision_id)
                result = CheckResult(decision_id, response.deny(500, response.error_body(
                    "the authorization service failed to process this request", "internal_error"), {}),
                    http_status=500, reason="internal_error")
            self._record(span, result, headers.get("x-request-id", ""), started)
        return result.response

    async def _evaluate(self, check_request: Any, decision_id: str) -> CheckResult:
        """input -> identity -> policy -> rate limits -> response; each step returns its value
        or raises Refusal, and what the steps returned so far goes into the result."""
        check_input = build_input(check_request, self._limits)
        identity: Identity | None = None
        decision: Decision | None = None
        limited: RateLimitResult | None = None
        try:
            identity = self._authenticate(check_input)
            body = check_input.parsed_body if isinstance(check_input.parsed_body, Mapping) else None
            estimated = estimate_tokens(body, self._config.ratelimit)
            saturated = self._saturation.saturated_models() if self._saturation is not None else []
            decision = await self._decide(policy_document(check_input, identity.to_input(), estimated, saturated))
            limited = await self._rate_limit(check_input, identity, decision, estimated)
            client_headers = {**decision.response_headers_to_add, **self._rate_limit_client_headers(limited)}
            if limited is not None and not limited.allowed and not self._config.ratelimit.shadow:
                raise Refusal(429, "rate_limited", response.deny(429, response.error_body(
                    "rate limit exceeded: " + ", ".join(
                        s.kind for s in limited.states if s.retry_after_s > 0) + " budget spent",
                    "rate_limit_error", "rate_limited"), client_headers))
        except Refusal as refusal:
            return CheckResult(decision_id, refusal.response, "deny", refusal.http_status, refusal.reason,
                               check_input, identity, decision, limited)
        upstream_headers = {**decision.headers, **self._rate_limit_upstream_headers(limited),
                            **self._identity_headers(identity, decision_id)}
        allowed = response.allow(upstream_headers, self._headers_to_remove(check_input.headers, upstream_headers,
                                                                           decision),
                                 client_headers, decision.dynamic_metadata)
        return CheckResult(decision_id, allowed, "allow", 200, decision.reason, check_input, identity, decision,
                           limited)

    def _authenticate(self, check_input: CheckInput) -> Identity:
        with self._child_span(names.IDENTITY_SPAN):
            try:
                return self._authenticator.authenticate(check_input.headers)
            except AuthError as exc:
                raise Refusal(401, exc.reason, response.deny(
                    401, response.error_body(exc.message, "authentication_error", exc.reason),
                    {"www-authenticate": exc.www_authenticate})) from None

    async def _decide(self, document: Mapping[str, Any]) -> Decision:
        """The policy's decision; a deny becomes a Refusal carrying the policy's answer."""
        with self._child_span(names.OPA_QUERY_SPAN) as opa_span:
            try:
                decision = await self._decider.decide(document)
            except DecisionUnavailable as exc:
                opa_span.set_status(trace.StatusCode.ERROR, str(exc))
                decision = self._on_opa_failure(exc)
            opa_span.set_attribute(names.CACHE_HIT, decision.source == "cache")
        self._metrics.cache.labels("hit" if decision.source == "cache" else "miss").inc()
        if not decision.allowed:
            body = decision.body or response.error_body("request denied by policy", "permission_denied",
                                                        decision.reason)
            raise Refusal(decision.http_status, decision.reason, response.deny(
                decision.http_status, body, {**decision.headers, **decision.response_headers_to_add},
                decision.dynamic_metadata))
        return decision

    async def _rate_limit(self, check_input: CheckInput, identity: Identity, decision: Decision,
                          estimated: int) -> RateLimitResult | None:
        """The charge's result; None when rate limits are off or no budget applies."""
        if self._rate_limiter is None:
            return None
        body = check_input.parsed_body if isinstance(check_input.parsed_body, Mapping) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else None
        try:
            budgets = budgets_for(identity.tenant, model, check_input.route, decision.rate_limit,
                                  self._config.ratelimit.rules, estimated)
        except ValueError as exc:  # a policy bug must not mean "no limit"
            log.error("policy returned an invalid rate_limit: %s", exc)
            raise _unavailable("invalid_rate_limit", "rate limits for this request are misconfigured") from None
        if not budgets:
            return None
        with self._child_span(names.RATELIMIT_SPAN) as span:
            try:
                result = await self._rate_limiter.charge(budgets)
            except RateLimitUnavailable:
                span.set_status(trace.StatusCode.ERROR, "rate-limit backend unavailable")
                self._metrics.ratelimit.labels("unavailable", self._config.ratelimit.backend).inc()
                raise _unavailable("ratelimit_unavailable", "rate limiting is temporarily unavailable") from None
            span.set_attribute(names.RATELIMIT_BACKEND, result.backend)
            span.set_attribute(names.RATELIMIT_DEGRADED, result.degraded)
        self._metrics.ratelimit.labels("allow" if result.allowed else "deny", result.backend).inc()
        return result

    @staticmethod
    def _rate_limit_client_headers(result: RateLimitResult | None) -> dict[str, str]:
        return rate_limit_headers(result) if result is not None else {}

    def _rate_limit_upstream_headers(self, result: RateLimitResult | None) -> dict[str, str]:
        return upstream_rate_limit_headers(result, self._prefix) if result is not None else {}

    def _child_span(self, name: str) -> Any:
        """A child of the current span, or nothing when the check is not being recorded.

        Unsampled checks are the common case; skipping their three child spans saves
        tens of microseconds a check.
        """
        if trace.get_current_span().is_recording():
            return self._tracer.start_as_current_span(name)
        return contextlib.nullcontext(trace.INVALID_SPAN)

    def _on_opa_failure(self, exc: DecisionUnavailable) -> Decision:
        """``opa.failure_mode`` allow: a fail-open decision; deny: Refusal 503."""
        mode = self._config.opa.failure_mode
        self._metrics.opa_failures.labels(mode).inc()
        log.warning("policy decision unavailable (%s): failing %s", exc, "open" if mode == "allow" else "closed")
        if mode == "allow":
            return Decision(allowed=True, reason="fail_open", source="fail_open")
        raise _unavailable("policy_unavailable", "authorization is temporarily unavailable")

    def _identity_headers(self, identity: Identity, decision_id: str) -> dict[str, str]:
        p = self._prefix
        headers = {f"{p}decision-id": decision_id}
        if identity.tenant:
            headers[f"{p}tenant"] = identity.tenant
        if identity.tier:
            headers[f"{p}tier"] = identity.tier
        if identity.subject:
            headers[f"{p}subject"] = identity.subject
        return headers

    def _headers_to_remove(self, incoming: Mapping[str, str], upstream: Mapping[str, str],
                           decision: Decision) -> list[str]:
        """Clients' copies of our headers, credentials, and what the policy asked to drop."""
        remove = {h for h in incoming if h.startswith(self._prefix) and h not in upstream}
        if self._config.strip_credentials:
            remove.update(h for h in self._credential_headers if h in incoming)
        remove.update(h.lower() for h in decision.request_headers_to_remove)
        return sorted(remove)

    def _record(self, span: trace.Span, result: CheckResult, request_id: str, started: float) -> None:
        latency = time.perf_counter() - started
        self._metrics.checks.labels(result.outcome, result.reason).inc()
        self._metrics.latency.observe(latency)
        identity, check_input = result.identity, result.input
        tenant = identity.tenant if identity else None
        if span.is_recording():
            span.set_attribute(names.DECISION, result.outcome)
            span.set_attribute(names.DECISION_ID, result.decision_id)
            span.set_attribute(names.HTTP_RESPONSE_STATUS_CODE, result.http_status)
            span.set_attribute(names.REASON, result.reason)
            span.set_attribute(names.CACHE_HIT, result.cache_hit)
            span.set_attribute(names.POLICY_REVISION, self._decider.revision[:16])
            if tenant:
                span.set_attribute(names.TENANT, tenant)
            for state in result.rate_limit.states if result.rate_limit else ():
                span.set_attribute(names.ratelimit_remaining(state.kind), state.remaining)
            if result.outcome != "allow":
                span.set_attribute(names.DENY_REASON, result.reason)
        self._decision_log.write(DecisionRecord(
            decision_id=result.decision_id,
            request_id=request_id,
            tenant=tenant,
            identity_method=identity.method if identity else "invalid",
            method=check_input.method if check_input else "",
            path=check_input.path if check_input else "",
            outcome=result.outcome,
            http_status=result.http_status,
            reason=result.reason,
            latency_ms=round(latency * 1000, 3),
            cache_hit=result.cache_hit,
            policy_revision=self._decider.revision[:16],
            shadow_denied=result.shadow_denied,
            rate_limit=result.rate_limit_record(),
        ))
