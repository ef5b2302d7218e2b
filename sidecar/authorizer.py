"""One check, end to end: input -> identity -> (prompt count) -> decision -> rate limits -> response.

With settlement on (``ratelimit.settle``), the rate-limit step reserves rather than
charges: prompt (counted by the inference server when ``ratelimit.count_url`` is set) plus the
completion allowance, weighted, under the decision id the upstream receives; ``settlement.py``
settles it when the server reports what was used.

This module only strings the steps together and records what happened (decision
log, metrics, span attributes); each step lives in its own module. It knows
nothing of gRPC: ``server.py`` hands it a CheckRequest (the HTTP transport an ``input.Request``)
and sends back the ``response.Answer`` it returns (as a CheckResponse, or framed as HTTP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import propagate, trace

from common.models import MODEL_VERSION_HEADER, ROUTED_MODEL_HEADER
from otel import names

from sidecar import response
from sidecar.config import SidecarConfig
from sidecar.decision import Decider, Decision, DecisionUnavailable
from sidecar.decision_log import DecisionLogger, DecisionRecord
from sidecar.identity import AuthError, Authenticator, Identity
from sidecar.input import CheckInput, InputLimits, Request, build_input, policy_document, request_of
from sidecar.metrics import SidecarMetrics
from sidecar.ratelimit import (
    RateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
    Reservation,
    rate_limit_headers,
    upstream_rate_limit_headers,
)
from sidecar.ratelimit.base import weighted_cost
from sidecar.ratelimit.count import PromptCounter
from sidecar.ratelimit.descriptors import (
    Limits,
    RequestTokens,
    budgets_of,
    limits_for,
    request_tokens,
    reservation_for,
)

log = logging.getLogger("kernelgate.authz")
# what _child_span gives an unrecorded check (reusable: entering it only returns the span)
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


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
    admission: Admission | None = None

    @property
    def rate_limit(self) -> RateLimitResult | None:
        return self.admission.result if self.admission is not None else None

    @property
    def cache_hit(self) -> bool:
        return self.decision is not None and self.decision.source == "cache"

    @property
    def shadow_denied(self) -> bool:
        """Rate limits would have denied, but ``ratelimit.shadow`` let it through."""
        return self.outcome == "allow" and self.rate_limit is not None and not self.rate_limit.allowed

    @property
    def routed(self) -> tuple[str | None, str | None]:
        """(model, version) an allowed request goes to, as the policy's headers name them; the
        version only when a canary rollout picked one (``MODEL_VERSION_HEADER``)."""
        if self.outcome != "allow" or self.decision is None:
            return None, None
        headers = self.decision.headers
        return headers.get(ROUTED_MODEL_HEADER), headers.get(MODEL_VERSION_HEADER)

    def rate_limit_record(self) -> dict[str, Any]:
        r = self.rate_limit
        if r is None:
            return {}
        record = {"backend": r.backend, "degraded": r.degraded,
                  "budgets": {s.kind: {"limit": s.limit, "remaining": s.remaining} for s in r.states}}
        if self.admission is not None:
            record.update(self.admission.record())
        return record


@dataclass(frozen=True)
class Admission:
    """What the rate-limit step took: the limiter's verdict and, when settlement is on, the
    reservation (to settle later) and the completion tokens granted when mid-stream
    enforcement caps the response."""

    result: RateLimitResult
    tokens: RequestTokens
    reservation: Reservation | None = None
    max_tokens: int | None = None
    cost: int = 0  # settlement off: the token cost charged at admission, for good

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.tokens.prompt, "prompt_counted": self.tokens.counted}
        if self.reservation is not None and self.result.allowed:
            out["reserved"] = self.reservation.reserved_cost
        elif self.reservation is None and self.result.allowed:
            out["charged"] = self.cost
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out


def _completion_that_fits(denied: RateLimitResult, tokens: RequestTokens, limits: Limits) -> int | None:
    """The most completion tokens (>= 1) the token budgets have room for now, if only they denied."""
    if any(s.retry_after_s > 0 for s in denied.states if s.kind != "tokens"):
        return None  # requests or concurrency said no: a smaller completion does not help
    room = min((s.remaining for s in denied.states if s.kind == "tokens"), default=0)
    grant = math.floor((room - tokens.prompt * limits.input_weight) / limits.output_weight)
    while grant >= 1 and weighted_cost(tokens.prompt, grant, limits.input_weight, limits.output_weight) > room:
        grant -= 1
    return min(grant, tokens.completion) if grant >= 1 else None


class Refusal(Exception):
    """A step ends the check with this answer (401, the policy's deny, 429, 503)."""

    def __init__(self, http_status: int, reason: str, response: Any, identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.http_status, self.reason, self.response = http_status, reason, response
        self.identity = identity  # a refused credential: which method (and issuer) refused it


def _unavailable(reason: str, message: str) -> Refusal:
    """503 + Retry-After: the sidecar cannot decide right now (fail closed)."""
    return Refusal(503, reason, response.deny(
        503, response.error_body(message, "service_unavailable", reason), {"retry-after": "1"}))


class Authorizer:
    def __init__(self, config: SidecarConfig, authenticator: Authenticator, decider: Decider,
                 rate_limiter: RateLimiter | None, decision_log: DecisionLogger,
                 metrics: SidecarMetrics, tracer: trace.Tracer | None = None,
                 saturation: SaturationView | None = None, prompt_counter: PromptCounter | None = None):
        """``rate_limiter`` None: rate limits are off (``build_rate_limiter`` decides); ``saturation``
        None: the policy is told of no saturated model; ``prompt_counter`` None: prompts are
        estimated (no ``ratelimit.count_url``)."""
        self._prompt_counter = prompt_counter
        self._reserve = config.ratelimit.settle
        self._config = config
        self._authenticator = authenticator
        self._decider = decider
        self._rate_limiter = rate_limiter
        self._decision_log = decision_log
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer(names.SIDECAR_TRACER)
        self._tracer_given = tracer is not None
        self._saturation = saturation
        self._limits = InputLimits(max_body_bytes=config.max_body_bytes)
        self._prefix = config.header_prefix.lower()
        self._credential_headers = ("authorization", config.identity.api_key_header.lower())
        # Decision ids only need to be unique, not secret: a seeded PRNG costs ~1 us, where
        # uuid4() reads the kernel's CSPRNG (~20 us a check on this project's VMs).
        self._ids = random.Random()

    async def check(self, check_request: Request | Any, call_metadata: Mapping[str, str] | None = None) -> Any:
        """``check_request``: a Request (the HTTP transport's) or gRPC's CheckRequest.
        ``call_metadata``: the gRPC call's metadata, where Envoy puts its ext_authz span's context."""
        started = time.perf_counter()
        decision_id = f"{self._ids.getrandbits(128):032x}"
        request = check_request if isinstance(check_request, Request) else request_of(check_request)
        headers = request.headers
        if not self._tracing():  # no span can be recorded: no context to extract, no span to start
            result = await self._checked(request, decision_id)
            self._record(trace.INVALID_SPAN, result, headers.get("x-request-id", ""), started)
            return result.response
        # the header map itself (no copy): the propagators only call get() and keys()
        carrier = call_metadata if call_metadata and "traceparent" in call_metadata else headers
        with self._tracer.start_as_current_span(names.AUTHZ_CHECK_SPAN, context=propagate.extract(carrier),
                                                kind=trace.SpanKind.SERVER) as span:
            result = await self._checked(request, decision_id)
            self._record(span, result, headers.get("x-request-id", ""), started)
        return result.response

    def _tracing(self) -> bool:
        """Whether a span may be recorded: a tracer was given, or an SDK tracer provider is installed
        (``otel.setup.configure_tracing``; telemetry off leaves the API's no-op proxy). Asked each
        check, so a provider installed after start-up is honoured. Nothing in the check path reads
        the span context but the span itself (no outgoing call carries it on)."""
        return self._tracer_given or not isinstance(trace.get_tracer_provider(),
                                                    (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    async def _checked(self, request: Request, decision_id: str) -> CheckResult:
        try:
            return await self._evaluate(request, decision_id)
        except Exception:  # noqa: BLE001 - a bug must answer 500, never kill the stream
            log.exception("check failed unexpectedly (decision %s)", decision_id)
            return CheckResult(decision_id, response.deny(500, response.error_body(
                "the authorization service failed to process this request", "internal_error"), {}),
                http_status=500, reason="internal_error")

    async def _evaluate(self, request: Request, decision_id: str) -> CheckResult:
        """input -> identity -> policy -> rate limits -> response; each step returns its value
        or raises Refusal, and what the steps returned so far goes into the result."""
        check_input = build_input(request, self._limits)
        identity: Identity | None = None
        decision: Decision | None = None
        admission: Admission | None = None
        try:
            identity = await self._authenticate(check_input)
            body = check_input.parsed_body if isinstance(check_input.parsed_body, Mapping) else None
            counted = await self._count_prompt(check_input, body) if self._prompt_counter is not None else None
            estimate = request_tokens(body, self._config.ratelimit, counted)
            saturated = self._saturation.saturated_models() if self._saturation is not None else []
            decision = await self._decide(policy_document(check_input, identity.to_input(), estimate.total, saturated))
            admission = await self._rate_limit(check_input, identity, decision, counted, decision_id,
                                               estimate if body is not None else None)
            limited = admission.result if admission is not None else None
            client_headers = {**decision.response_headers_to_add, **self._rate_limit_client_headers(limited)}
            if limited is not None and not limited.allowed and not self._config.ratelimit.shadow:
                raise Refusal(429, "rate_limited", response.deny(429, response.error_body(
                    "rate limit exceeded: " + ", ".join(
                        s.kind for s in limited.states if s.retry_after_s > 0) + " budget spent",
                    "rate_limit_error", "rate_limited"), client_headers))
        except Refusal as refusal:
            return CheckResult(decision_id, refusal.response, "deny", refusal.http_status, refusal.reason,
                               check_input, identity or refusal.identity, decision, admission)
        upstream_headers = {**decision.headers, **self._rate_limit_upstream_headers(limited),
                            **self._identity_headers(identity, decision_id)}
        if admission is not None and admission.max_tokens is not None:
            upstream_headers[f"{self._prefix}max-tokens"] = str(admission.max_tokens)
        allowed = response.allow(upstream_headers, self._headers_to_remove(check_input.headers, upstream_headers,
                                                                           decision),
                                 client_headers, decision.dynamic_metadata)
        return CheckResult(decision_id, allowed, "allow", 200, decision.reason, check_input, identity, decision,
                           admission)

    async def _authenticate(self, check_input: CheckInput) -> Identity:
        with self._child_span(names.IDENTITY_SPAN):
            try:
                return await self._authenticator.authenticate(
                    check_input.headers, check_input.peer_principal, check_input.peer_certificate)
            except AuthError as exc:
                raise Refusal(exc.http_status, exc.reason, response.deny(
                    exc.http_status, response.error_body(exc.message, "authentication_error", exc.reason),
                    exc.response_headers), exc.identity) from None

    async def _decide(self, document: Mapping[str, Any]) -> Decision:
        """The policy's decision; a deny becomes a Refusal carrying the policy's answer."""
        with self._child_span(names.OPA_QUERY_SPAN) as opa_span:
            try:
                decision = await self._decider.decide(document)
            except DecisionUnavailable as exc:
                opa_span.set_status(trace.StatusCode.ERROR, str(exc))
                decision = self._on_opa_failure(exc)
            opa_span.set_attribute(names.CACHE_HIT, decision.source == "cache")
        self._metrics.count(self._metrics.cache, "hit" if decision.source == "cache" else "miss")
        if not decision.allowed:
            body = decision.body or response.error_body("request denied by policy", "permission_denied",
                                                        decision.reason)
            raise Refusal(decision.http_status, decision.reason, response.deny(
                decision.http_status, body, {**decision.headers, **decision.response_headers_to_add},
                decision.dynamic_metadata))
        return decision

    async def _count_prompt(self, check_input: CheckInput, body: Mapping[str, Any] | None) -> int | None:
        """The prompt's tokens by the served model's tokenizer; None: estimate instead."""
        if self._prompt_counter is None or body is None or self._rate_limiter is None:
            return None
        raw = check_input.document["attributes"]["request"]["http"].get("body", "")
        with self._child_span(names.PROMPT_COUNT_SPAN):
            counted = await self._prompt_counter.count(raw, body)
        self._metrics.prompt_counts.labels("server" if counted is not None else "estimate").inc()
        return counted

    async def _rate_limit(self, check_input: CheckInput, identity: Identity, decision: Decision,
                          counted_prompt: int | None, decision_id: str,
                          estimate: RequestTokens | None = None) -> Admission | None:
        """What the limiter took; None when rate limits are off or no limit applies. ``estimate``: the
        JSON body's tokens with the config's completion default (what the policy was told)."""
        if self._rate_limiter is None:
            return None
        body = check_input.parsed_body if isinstance(check_input.parsed_body, Mapping) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else None
        tenant = identity.tenant or ""
        try:
            limits = limits_for(tenant, model, check_input.route, decision.rate_limit, self._config.ratelimit.rules)
        except ValueError as exc:  # a policy bug must not mean "no limit"
            log.error("policy returned an invalid rate_limit: %s", exc)
            raise _unavailable("invalid_rate_limit", "rate limits for this request are misconfigured") from None
        if limits is None or (limits.requests is None and limits.tokens is None and limits.concurrency is None):
            return None
        tokens = (estimate if estimate is not None and limits.default_max_tokens is None
                  else request_tokens(body, self._config.ratelimit, counted_prompt, limits.default_max_tokens))
        with self._child_span(names.RATELIMIT_SPAN) as span:
            try:
                admission = await self._admit(limits, tenant, model or "", check_input.route, tokens, decision_id)
            except RateLimitUnavailable:
                span.set_status(trace.StatusCode.ERROR, "rate-limit backend unavailable")
                self._metrics.ratelimit.labels("unavailable", self._config.ratelimit.backend).inc()
                raise _unavailable("ratelimit_unavailable", "rate limiting is temporarily unavailable") from None
            span.set_attribute(names.RATELIMIT_BACKEND, admission.result.backend)
            span.set_attribute(names.RATELIMIT_DEGRADED, admission.result.degraded)
        result = admission.result
        self._metrics.count(self._metrics.ratelimit, "allow" if result.allowed else "deny", result.backend)
        if result.allowed and admission.reservation is not None and limits.tokens is not None:
            self._metrics.count(self._metrics.tokens, tenant or "none", "reserved",
                                amount=admission.reservation.reserved_cost)
        return admission

    async def _admit(self, limits: Limits, tenant: str, model: str, route: str, tokens: RequestTokens,
                     decision_id: str) -> Admission:
        """Charge the estimate (settlement off), or reserve; with mid-stream enforcement, a request the
        budget cannot hold in full is admitted with what is left, as a cap on its completion."""
        if not self._reserve:
            cost = weighted_cost(tokens.prompt, tokens.completion, limits.input_weight, limits.output_weight)
            result = await self._rate_limiter.charge(budgets_of(limits, tenant, model, route, cost))
            return Admission(result, tokens, cost=cost if limits.tokens is not None else 0)
        ttl = self._config.ratelimit.reservation_ttl_s
        reservation = reservation_for(decision_id, limits, tenant, model, route, tokens, ttl)
        result = await self._rate_limiter.reserve(reservation)
        if not limits.enforce_midstream or limits.tokens is None:
            return Admission(result, tokens, reservation)
        if result.allowed:
            return Admission(result, tokens, reservation, tokens.completion)
        grant = _completion_that_fits(result, tokens, limits)
        if grant is None:
            return Admission(result, tokens, reservation)
        capped = RequestTokens(tokens.prompt, grant, tokens.counted)
        reservation = reservation_for(decision_id, limits, tenant, model, route, capped, ttl)
        return Admission(await self._rate_limiter.reserve(reservation), capped, reservation, grant)

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
        return _NO_SPAN

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
        self._metrics.count(self._metrics.checks, result.outcome, result.reason)
        self._metrics.latency.observe(latency)
        identity, check_input = result.identity, result.input
        tenant = identity.tenant if identity else None
        model, version = result.routed
        if version is not None:
            self._metrics.model_versions.labels(model or "", version).inc()
        if span.is_recording():
            span.set_attribute(names.DECISION, result.outcome)
            span.set_attribute(names.DECISION_ID, result.decision_id)
            span.set_attribute(names.HTTP_RESPONSE_STATUS_CODE, result.http_status)
            span.set_attribute(names.REASON, result.reason)
            span.set_attribute(names.CACHE_HIT, result.cache_hit)
            span.set_attribute(names.POLICY_REVISION, self._decider.revision[:16])
            if tenant:
                span.set_attribute(names.TENANT, tenant)
            if version is not None:
                span.set_attribute(names.MODEL_VERSION, version)
            for state in result.rate_limit.states if result.rate_limit else ():
                span.set_attribute(names.ratelimit_remaining(state.kind), state.remaining)
            if result.outcome != "allow":
                span.set_attribute(names.DENY_REASON, result.reason)
        if not self._decision_log.enabled:
            return
        self._decision_log.write(DecisionRecord(
            decision_id=result.decision_id,
            request_id=request_id,
            tenant=tenant,
            identity_method=identity.method if identity else "invalid",
            identity_issuer=identity.issuer if identity else None,
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
            model=model,
            model_version=version,
        ))
