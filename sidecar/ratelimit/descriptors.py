"""What a request costs: which limits apply (policy first, then config rules), the budgets and
concurrency slots they give, and the request's tokens (counted prompt or estimate, plus allowance).

Budgets are per distinct (tenant, model, route) value, like a descriptor without a fixed value
in envoyproxy/ratelimit: a rule with ``model: "*"`` gives every model its own budget. A missing
tenant or model (anonymous caller, no body) is the empty string, which no real tenant is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from dataclasses import dataclass

from sidecar.config import UNIT_SECONDS, LimitRule, RateLimitConfig
from sidecar.ratelimit.base import Budget, Reservation, Slot, weighted_cost


@dataclass(frozen=True)
class Limits:
    """The limits one request is under (a config rule, or the policy's ``rate_limit`` object)."""

    requests: int | None
    tokens: int | None
    period_s: float
    concurrency: int | None = None
    input_weight: float = 1.0
    output_weight: float = 1.0
    default_max_tokens: int | None = None
    enforce_midstream: bool = False


@dataclass(frozen=True)
class RequestTokens:
    """Prompt tokens (counted by the served model's tokenizer, or estimated) and the completion
    allowance (max_tokens, else the limit's default, times ``n``)."""

    prompt: int
    completion: int
    counted: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def escape(value: str) -> str:
    """Keep ``|`` and ``=`` (the key's separators) out of values, reversibly."""
    return value.replace("%", "%25").replace("|", "%7C").replace("=", "%3D")


def budget_key(tenant: str, model: str, route: str, kind: str) -> str:
    return f"tenant={escape(tenant)}|model={escape(model)}|route={escape(route)}|{kind}"


def budgets_for(
    identity_tenant: str | None,
    model: str | None,
    route: str,
    policy_limit: Mapping[str, Any] | None,
    rules: Sequence[LimitRule],
    estimated_tokens: int,
) -> list[Budget]:
    """The budgets this request draws on: the policy's ``rate_limit`` object if it gave one,
    else the first rule matching (tenant, model, route); none if neither applies.

    Raises ValueError for a malformed policy ``rate_limit`` (a policy bug must not mean "no limit").
    """
    limits = limits_for(identity_tenant, model, route, policy_limit, rules)
    if limits is None:
        return []
    return budgets_of(limits, identity_tenant or "", model or "", route, max(0, estimated_tokens))


def limits_for(identity_tenant: str | None, model: str | None, route: str, policy_limit: Mapping[str, Any] | None,
               rules: Sequence[LimitRule]) -> Limits | None:
    """The policy's limits if it gave some, else the first rule matching (tenant, model, route)."""
    tenant, model = identity_tenant or "", model or ""
    if policy_limit is not None:
        return _policy_limits(policy_limit)
    rule = next((r for r in rules if _matches(r, tenant, model, route)), None)
    if rule is None:
        return None
    return Limits(rule.requests, rule.tokens, UNIT_SECONDS[rule.unit], rule.concurrency, rule.input_weight,
                  rule.output_weight, rule.default_max_tokens, rule.enforce_midstream)


def budgets_of(limits: Limits, tenant: str, model: str, route: str, token_cost: int) -> list[Budget]:
    budgets = []
    if limits.requests is not None:
        budgets.append(Budget(budget_key(tenant, model, route, "requests"), limits.requests, limits.period_s, 1,
                              "requests"))
    if limits.tokens is not None:
        budgets.append(Budget(budget_key(tenant, model, route, "tokens"), limits.tokens, limits.period_s,
                              token_cost, "tokens"))
    return budgets


def reservation_for(reservation_id: str, limits: Limits, tenant: str, model: str, route: str,
                    tokens: RequestTokens, ttl_s: float) -> Reservation:
    """Reserve the prompt and the completion allowance, weighted, on every budget; a slot if limited."""
    cost = weighted_cost(tokens.prompt, tokens.completion, limits.input_weight, limits.output_weight)
    slots = ((Slot(budget_key(tenant, model, route, "concurrency"), limits.concurrency),)
             if limits.concurrency is not None else ())
    return Reservation(reservation_id, tenant, tuple(budgets_of(limits, tenant, model, route, cost)), slots, ttl_s,
                       cost if limits.tokens is not None else 0, limits.input_weight, limits.output_weight,
                       tokens.prompt, tokens.completion)


def _matches(rule: LimitRule, tenant: str, model: str, route: str) -> bool:
    return (fnmatchcase(tenant, rule.tenant) and fnmatchcase(model, rule.model)
            and fnmatchcase(route, rule.route))


def _policy_limits(limit: Mapping[str, Any]) -> Limits:
    unit = limit.get("unit", "minute")
    if unit not in UNIT_SECONDS:
        raise ValueError(f"policy rate_limit.unit must be one of {', '.join(UNIT_SECONDS)}")
    values = {}
    for name in ("requests", "tokens", "concurrency", "default_max_tokens"):
        value = limit.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"policy rate_limit.{name} must be a positive integer")
        values[name] = value
    weights = {}
    for name in ("input_weight", "output_weight"):
        value = limit.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (
                name == "output_weight" and value == 0):
            raise ValueError(f"policy rate_limit.{name} must be a number >= 0 (output_weight > 0)")
        weights[name] = float(value)
    midstream = limit.get("enforce_midstream", False)
    if not isinstance(midstream, bool):
        raise ValueError("policy rate_limit.enforce_midstream must be a boolean")
    return Limits(values["requests"], values["tokens"], UNIT_SECONDS[unit], values["concurrency"],
                  weights["input_weight"], weights["output_weight"], values["default_max_tokens"], midstream)


def request_tokens(parsed_body: Mapping[str, Any] | None, config: RateLimitConfig, counted_prompt: int | None = None,
                   default_max_tokens: int | None = None) -> RequestTokens:
    """The prompt (``counted_prompt`` when the server counted it, else the estimate) and the
    completion allowance (``default_max_tokens`` when the client gives none; else the config's)."""
    if not isinstance(parsed_body, Mapping):
        return RequestTokens(0, 0)
    if counted_prompt is None:
        chars, ids = _prompt_size(parsed_body)
        prompt = ids + math.ceil(chars / config.chars_per_token)
    else:
        prompt = counted_prompt
    completion = _int_field(parsed_body, "max_tokens")
    if completion is None:
        completion = _int_field(parsed_body, "max_completion_tokens")
    if completion is None:
        completion = default_max_tokens if default_max_tokens is not None else config.default_max_tokens
    choices = _int_field(parsed_body, "n")
    return RequestTokens(prompt, max(0, completion) * max(1, choices if choices is not None else 1),
                         counted_prompt is not None)


def estimate_tokens(parsed_body: Mapping[str, Any] | None, config: RateLimitConfig) -> int:
    """Tokens a completion request may use: prompt estimate plus the completion allowance.

    The prompt is ``prompt`` (text, texts or token ids) or chat ``messages[].content`` (text or
    text parts), at ``chars_per_token`` characters a token. The allowance is ``max_tokens``, else
    ``max_completion_tokens``, else ``default_max_tokens``, times ``n`` choices. Non-integer
    values are ignored (validating them is the policy's job); negatives count as 0.
    """
    return request_tokens(parsed_body, config).total


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _prompt_size(body: Mapping[str, Any]) -> tuple[int, int]:
    """(characters of text, tokens given as ids) of the prompt or messages."""
    chars = tokens = 0
    prompt = body.get("prompt")
    parts = prompt if isinstance(prompt, list) else [prompt]
    for part in parts:
        if isinstance(part, str):
            chars += len(part)
        elif isinstance(part, int) and not isinstance(part, bool):
            tokens += 1  # a prompt of token ids
        elif isinstance(part, list):
            tokens += sum(1 for t in part if isinstance(t, int) and not isinstance(t, bool))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p["text"]) for p in content
                             if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return chars, tokens
