"""What a request costs: which budgets apply (policy first, then config rules) and its token estimate.

Budgets are per distinct (tenant, model, route) value, like a descriptor without a fixed value
in envoyproxy/ratelimit: a rule with ``model: "*"`` gives every model its own budget. A missing
tenant or model (anonymous caller, no body) is the empty string, which no real tenant is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from sidecar.config import UNIT_SECONDS, LimitRule, RateLimitConfig
from sidecar.ratelimit.base import Budget


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
    tenant, model = identity_tenant or "", model or ""
    if policy_limit is not None:
        requests, tokens, period_s = _policy_limits(policy_limit)
    else:
        rule = next((r for r in rules if _matches(r, tenant, model, route)), None)
        if rule is None:
            return []
        requests, tokens, period_s = rule.requests, rule.tokens, UNIT_SECONDS[rule.unit]
    budgets = []
    if requests is not None:
        budgets.append(Budget(budget_key(tenant, model, route, "requests"), requests, period_s, 1, "requests"))
    if tokens is not None:
        budgets.append(Budget(budget_key(tenant, model, route, "tokens"), tokens, period_s,
                              max(0, estimated_tokens), "tokens"))
    return budgets


def _matches(rule: LimitRule, tenant: str, model: str, route: str) -> bool:
    return (fnmatchcase(tenant, rule.tenant) and fnmatchcase(model, rule.model)
            and fnmatchcase(route, rule.route))


def _policy_limits(limit: Mapping[str, Any]) -> tuple[int | None, int | None, float]:
    unit = limit.get("unit", "minute")
    if unit not in UNIT_SECONDS:
        raise ValueError(f"policy rate_limit.unit must be one of {', '.join(UNIT_SECONDS)}")
    values = []
    for name in ("requests", "tokens"):
        value = limit.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"policy rate_limit.{name} must be a positive integer")
        values.append(value)
    return values[0], values[1], UNIT_SECONDS[unit]


def estimate_tokens(parsed_body: Mapping[str, Any] | None, config: RateLimitConfig) -> int:
    """Tokens a completion request may use: prompt estimate plus the completion allowance.

    The prompt is ``prompt`` (text, texts or token ids) or chat ``messages[].content`` (text or
    text parts), at ``chars_per_token`` characters a token. The allowance is ``max_tokens``, else
    ``max_completion_tokens``, else ``default_max_tokens``, times ``n`` choices. Non-integer
    values are ignored (validating them is the policy's job); negatives count as 0.
    """
    if not isinstance(parsed_body, Mapping):
        return 0
    chars, tokens = _prompt_size(parsed_body)
    prompt_tokens = tokens + math.ceil(chars / config.chars_per_token)
    completion = _int_field(parsed_body, "max_tokens")
    if completion is None:
        completion = _int_field(parsed_body, "max_completion_tokens")
    if completion is None:
        completion = config.default_max_tokens
    choices = _int_field(parsed_body, "n")
    return prompt_tokens + max(0, completion) * max(1, choices if choices is not None else 1)


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
