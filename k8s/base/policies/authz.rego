# kernelgate authorization policy.
#
# The sidecar asks for data.envoy.authz.result with OPA-Envoy's input document plus
# input.identity (who is calling) and input.kernelgate (what the sidecar found wrong
# with the body). The answer is OPA-Envoy's decision object plus `reason` (a short
# machine code, always present) and, on allowed inference calls, `rate_limit`.
#
# Exactly one outcome: `result` is one ordered `else` chain and every helper it reads
# is single-valued, so no two rules can disagree and make OPA fail with
# "complete rules must not produce multiple outputs". Anything the chain does not
# cover falls to the default: 403 "denied" (fail closed).
#
# Cache safety: the sidecar caches decisions on the input minus per-request noise
# (request id, trace headers, content-length, source port). This policy reads none
# of those, so a cached decision always equals the one OPA would give.
package envoy.authz

# ---------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------

default result := {
	"allowed": false,
	"http_status": 403,
	"headers": {"content-type": "application/json"},
	"response_headers_to_add": {},
	"request_headers_to_remove": [],
	"body": `{"error":{"code":"denied","message":"Request denied by policy.","param":null,"type":"permission_error"}}`,
	"dynamic_metadata": {},
	"reason": "denied",
}

# Order is the priority: public paths first, then the first failed check (see
# `_problem`), then the allow for the route's kind.
result := _public_allow if {
	_route.public
	_method in _route.methods
} else := _deny(_problem) if {
	_problem
} else := _requests_only_allow if {
	_route.budget == "requests"
} else := _degraded if {
	_route.kind
	_saturated(_model_name)
	_on_saturation.action in {"fallback", "reject"}
} else := _inference_allow if {
	_route.kind
}

# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

# The route table lives in the policy, not in data: it mirrors what the upstream
# serves and changes with code, not with tenants. `path` is compared as a segment
# list, so "/v1/chat%2Fcompletions" (one decoded segment "chat/completions") does
# not match "/v1/chat/completions". The one list of routes is common/routes.py:
# this table must equal its ROUTES row for row (tests/common/test_routes.py checks).
_routes := [
	{"id": "healthz", "path": ["healthz"], "methods": ["GET"], "public": true},
	{"id": "readyz", "path": ["readyz"], "methods": ["GET"], "public": true},
	{"id": "completions", "path": ["v1", "completions"], "methods": ["POST"], "scope": "completions", "kind": "generate"},
	{"id": "chat", "path": ["v1", "chat", "completions"], "methods": ["POST"], "scope": "completions", "kind": "generate"},
	{"id": "embeddings", "path": ["v1", "embeddings"], "methods": ["POST"], "scope": "embeddings", "kind": "embed"},
	{"id": "models", "path": ["v1", "models"], "methods": ["GET"], "scope": "models", "budget": "requests"},
	{"id": "tokenize", "path": ["tokenize"], "methods": ["POST"], "scope": "completions", "budget": "requests"},
]

# Paths are unique in the table, so at most one route matches.
_route := r if {
	some r in _routes
	r.path == input.parsed_path
}

_method := object.get(input, ["attributes", "request", "http", "method"], "")

# Only for messages; the raw path is not echoed because its query may hold secrets.
_display_path := concat("", ["/", concat("/", input.parsed_path)]) if {
	is_array(input.parsed_path)
} else := "/"

# ---------------------------------------------------------------------------
# Identity, tenant and tier
# ---------------------------------------------------------------------------

# Only an explicit `true` authenticates; a missing identity is anonymous.
_authenticated if input.identity.authenticated == true

_tenant_name := input.identity.tenant if is_string(input.identity.tenant)

_tenant := data.kernelgate.tenants[_tenant_name]

# The credential (JWT claim or API-key record) also carries a tier, but it is
# informational only: ceilings, body limits and budgets come from the tier the
# DATA gives the tenant, so a stale or forged-by-config credential cannot buy a
# bigger tier.
_tier_name := _tenant.tier

_tier := data.kernelgate.tiers[_tier_name]

# A tenant whose tier is missing from data, or lacks a ceiling or budget, is a
# config error: fail closed here rather than let a missing number silently skip
# a check further down. `disabled` counts unless it is absent or exactly false.
_tenant_allowed if {
	_tier_complete
	object.get(_tenant, "disabled", false) == false
}

_tier_complete if {
	is_number(_tier.max_tokens)
	is_number(_tier.max_body_bytes)
	is_number(_tier.limits.requests)
	is_number(_tier.limits.tokens)
}

# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------

_has_scope(scope) if scope in input.identity.scopes

_has_scope(_) if "*" in input.identity.scopes

# ---------------------------------------------------------------------------
# Body
# ---------------------------------------------------------------------------

# The body's size in bytes: Envoy's `size`, or -1 when Envoy does not know it
# (chunked uploads). Then the body itself is measured, once, in bytes: `count` on
# a string counts characters, so count the hex encoding (two per byte).
# content-length is not read: it is left out of the sidecar's cache key.
_body_size := input.attributes.request.http.size if {
	is_number(input.attributes.request.http.size)
	input.attributes.request.http.size >= 0
} else := count(hex.encode(input.attributes.request.http.body)) / 2 if {
	is_string(input.attributes.request.http.body)
}

_body_too_large if input.kernelgate.body_error == "too_large"

# A truncated body was cut by Envoy's buffer, so it was larger than allowed there.
_body_too_large if input.truncated_body == true

_body_too_large if _body_size > _tier.max_body_bytes

# The sidecar names JSON problems; a body that is absent or not JSON at all (no
# error, no parsed_body) is just as unusable.
_body_invalid if input.kernelgate.body_error in {"invalid_json", "not_an_object"}

_body_invalid if not _body_is_object

# A helper, not `not is_object(input.parsed_body)`: OPA evaluates a call's
# argument refs outside the negation, so that expression is undefined, not true,
# when parsed_body is absent.
_body_is_object if is_object(input.parsed_body)

_body_invalid_message := "The request body must be a JSON object, not an array or a scalar." if {
	input.kernelgate.body_error == "not_an_object"
} else := "We could not parse the JSON body of your request. The body must be a JSON object."

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

_model_name := input.parsed_body.model if {
	is_string(input.parsed_body.model)
	input.parsed_body.model != ""
}

_model := data.kernelgate.models[_model_name]

# The tenant's own list wins when it has one; otherwise its tier's list applies.
# Neither list: no model is allowed (fail closed). "*" allows every model.
_model_allow_list := _tenant.models if {
	"models" in object.keys(_tenant)
} else := _tier.models

_model_allowed if _allowed_model(_model_name)

_allowed_model(_) if "*" in _model_allow_list

_allowed_model(name) if name in _model_allow_list

_model_fits_route if _model.kind == _route.kind

# ---------------------------------------------------------------------------
# max_tokens
# ---------------------------------------------------------------------------

# Both names mean the same budget (max_completion_tokens is OpenAI's newer name);
# each one present is checked. JSON null means "use the default" in OpenAI's API,
# so it counts as absent.
_token_fields := ["max_tokens", "max_completion_tokens"]

_token_values[f] := v if {
	some f in _token_fields
	v := input.parsed_body[f]
	v != null
}

# Below 2^31 (as a 32-bit signed count): beyond it the OPA server and its Wasm build disagree
# on round() (1e308), and the Wasm build's format_int aborts.
_non_negative_int(v) if {
	is_number(v)
	v >= 0
	v < 2147483648
	v == round(v)
}

# First offending field, in _token_fields order, so the answer is deterministic.
_bad_token_field := [f |
	some f in _token_fields
	v := _token_values[f]
	not _non_negative_int(v)
][0]

_token_field_over_ceiling := [f |
	some f in _token_fields
	_token_values[f] > _tier.max_tokens
][0]

# ---------------------------------------------------------------------------
# Checks, in priority order: the first failing one is the answer
# ---------------------------------------------------------------------------

# Each branch's value must be defined whenever its condition holds: in an `else`
# chain an undefined value skips to the next branch, which could end in an allow.
# Hence messages use only values the earlier checks guarantee, or object.get.

# Routes come first: an unknown route is 404 for everyone, anonymous or not, so
# a typo is not reported as a credentials problem (the route list is no secret:
# it is OpenAI's public API). A wrong method on a known route is 405 for the
# same reason.
_problem := _p(404, "route_not_found", sprintf("Invalid URL (%s %s)", [_method, _display_path]), null, {}) if {
	not _route
} else := _p(
	405, "method_not_allowed",
	sprintf("Method %s is not allowed on %s; use %s.", [_method, _display_path, concat(", ", _route.methods)]),
	null, {"allow": concat(", ", _route.methods)},
) if {
	not _method in _route.methods
} else := _p(
	401, "missing_credentials",
	"Missing or invalid credentials. Send an API key or a bearer token.",
	null, {"www-authenticate": `Bearer realm="kernelgate"`},
) if {
	# Public routes with an allowed method were answered before this chain is read.
	not _authenticated
} else := _p(403, "tenant_not_allowed", "Your organization is not allowed to use this service.", null, {}) if {
	not _tenant_allowed
} else := _p(
	403, "missing_scope",
	sprintf("Your credentials lack the '%s' scope required by %s.", [_route.scope, _display_path]),
	null, {},
) if {
	not _has_scope(_route.scope)
} else := _p(
	413, "body_too_large",
	sprintf("Request body is too large; the limit for tier %s is %d bytes.", [_tier_name, _tier.max_body_bytes]),
	null, {},
) if {
	# Body checks apply to the inference routes only (those with a model kind).
	_route.kind
	_body_too_large
} else := _p(400, "invalid_json", _body_invalid_message, null, {}) if {
	_route.kind
	_body_invalid
} else := _p(400, "missing_model", "You must provide a model parameter (a non-empty string).", "model", {}) if {
	_route.kind
	not _model_name
} else := _p(
	404, "model_not_found",
	sprintf("The model `%s` does not exist or you do not have access to it.", [_model_name]),
	"model", {},
) if {
	_route.kind
	not _model
} else := _p(
	403, "model_not_allowed",
	sprintf("The model `%s` is not enabled for your organization.", [_model_name]),
	"model", {},
) if {
	_route.kind
	not _model_allowed
} else := _p(
	400, "wrong_model_kind",
	sprintf(
		"The model `%s` is a %s model and cannot be used with %s.",
		[_model_name, object.get(_model, "kind", "unknown"), _display_path],
	),
	"model", {},
) if {
	# Written as "not fits" so a model without a kind is refused, not waved through.
	_route.kind
	not _model_fits_route
} else := _p(
	400, "invalid_max_tokens",
	sprintf("Invalid '%s': expected a non-negative integer below 2147483648.", [_bad_token_field]),
	_bad_token_field, {},
) if {
	_route.kind
	_bad_token_field
} else := _p(
	400, "max_tokens_over_ceiling",
	sprintf(
		"'%s' is too large: %s. The ceiling for tier %s is %d.",
		# format_int, not %v: the Wasm build prints a count sent as 257.0 as "257.0", the server as "257"
		[_token_field_over_ceiling, format_int(_token_values[_token_field_over_ceiling], 10), _tier_name, _tier.max_tokens],
	),
	_token_field_over_ceiling, {},
) if {
	_route.kind
	_token_field_over_ceiling
}

_p(status, reason, message, param, headers) := {
	"status": status,
	"reason": reason,
	"message": message,
	"param": param,
	"headers": headers,
}

# ---------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------

# OpenAI's error types, by status.
_error_types := {
	400: "invalid_request_error",
	401: "authentication_error",
	403: "permission_error",
	404: "invalid_request_error",
	405: "invalid_request_error",
	413: "invalid_request_error",
	429: "rate_limit_error",
}

# Denied: `headers` go on the response to the client; the body is OpenAI's error shape.
_deny(p) := {
	"allowed": false,
	"http_status": p.status,
	"headers": object.union({"content-type": "application/json"}, p.headers),
	"response_headers_to_add": {},
	"request_headers_to_remove": [],
	"body": json.marshal({"error": {
		"message": p.message,
		"type": object.get(_error_types, p.status, "invalid_request_error"),
		"param": p.param,
		"code": p.reason,
	}}),
	"dynamic_metadata": {},
	"reason": p.reason,
}

# Health checks: no identity, no budget.
_public_allow := {
	"allowed": true,
	"http_status": 200,
	"headers": {},
	"response_headers_to_add": {},
	"request_headers_to_remove": [],
	"body": "",
	"dynamic_metadata": {},
	"reason": "public",
}

_allow(headers, rate_limit) := {
	"allowed": true,
	"http_status": 200,
	"headers": headers,
	"response_headers_to_add": {},
	"request_headers_to_remove": [],
	"body": "",
	"dynamic_metadata": {},
	"reason": "ok",
	"rate_limit": rate_limit,
}

# Budgets: the tier's limits, then the tenant's "*" override, then the tenant's
# override for this model (data.kernelgate.tenants[t].limits[model]); later wins,
# field by field.
_tenant_limits := object.union(_tier.limits, object.get(_tenant, ["limits", "*"], {}))

_model_limits := object.union(_tenant_limits, object.get(_tenant, ["limits", _model_name], {}))

_unit(limits) := object.get(limits, "unit", "minute")

# Routes that run no model (listing models, counting tokens) cost no tokens: only
# the request budget applies, so the decision names no token budget at all.
_requests_only_allow := _allow(
	{"x-kernelgate-tenant": _tenant_name, "x-kernelgate-tier": _tier_name},
	{"requests": _tenant_limits.requests, "unit": _unit(_tenant_limits)},
)

# Token accounting options ride along when the data sets them (concurrency, input/output
# weights, the completion allowance when a client sends no max_tokens, mid-stream enforcement).
_limit_options := {"concurrency", "input_weight", "output_weight", "default_max_tokens", "enforce_midstream"}

_inference_allow := _allow(
	object.union(
		{"x-kernelgate-tenant": _tenant_name, "x-kernelgate-tier": _tier_name, "x-kernelgate-model": _model_name},
		_version_header,
	),
	object.union(
		{"requests": _model_limits.requests, "tokens": _model_limits.tokens, "unit": _unit(_model_limits)},
		object.filter(_model_limits, _limit_options),
	),
)

# ---------------------------------------------------------------------------
# Canary: which version of the model serves the request (docs/models.md)
# ---------------------------------------------------------------------------

# data.kernelgate.rollouts[model] = {"weights": {"v1": 90, "v2": 10},
# "tenants": {"acme": {"v1": 50, "v2": 50}}, "key_header": "x-session-id"}: the tenant's
# weights when it has its own, else the model's. The version is picked from a stable key, so a
# conversation stays on one version while the weights stay the same: the key_header's value
# (default x-session-id), else the body's OpenAI `user`, else the tenant. sha256(model/key)'s
# first 4 hex digits make a point in [0, 65536) scaled onto the weights' sum; the versions are
# laid out in name order. No rollout, or every weight 0: no header, the active version serves.
# The inference server rolls a failing canary back by asking the sidecar to write its weight 0
# here (docs/models.md, "Automatic rollback").
_rollout := data.kernelgate.rollouts[_model_name]

_weights := _rollout.tenants[_tenant_name] if {
	is_object(_rollout.tenants[_tenant_name])
} else := _rollout.weights

_rollout_versions := sort([v | some v, w in _weights; is_number(w); w > 0])

_rollout_total := sum([_weights[v] | some v in _rollout_versions])

_rollout_key := input.attributes.request.http.headers[lower(object.get(_rollout, "key_header", "x-session-id"))] if {
	input.attributes.request.http.headers[lower(object.get(_rollout, "key_header", "x-session-id"))] != ""
} else := input.parsed_body.user if {
	is_string(input.parsed_body.user)
	input.parsed_body.user != ""
} else := _tenant_name

_hex := {
	"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6, "7": 7, "8": 8, "9": 9,
	"a": 10, "b": 11, "c": 12, "d": 13, "e": 14, "f": 15,
}

_rollout_point := p if {
	d := crypto.sha256(concat("/", [_model_name, _rollout_key]))
	bucket := ((((_hex[substring(d, 0, 1)] * 16) + _hex[substring(d, 1, 1)]) * 16) + _hex[substring(d, 2, 1)]) * 16
	p := ((bucket + _hex[substring(d, 3, 1)]) * _rollout_total) / 65536
}

# The one version whose interval [below, below + weight) holds the point.
_picked_version := v if {
	some i, v in _rollout_versions
	below := sum([_weights[u] | some j, u in _rollout_versions; j < i])
	below <= _rollout_point
	_rollout_point < below + _weights[v]
}

_version_header := {"x-kernelgate-model-version": _picked_version} if {
	_picked_version
} else := {}

# ---------------------------------------------------------------------------
# Degradation: no replica of the model has room
# ---------------------------------------------------------------------------

# The sidecar lists the models whose every replica is saturated (batch and queue full) or
# down; it learns this by polling the replicas' load. Absent: nothing is saturated.
_saturated(name) if name in object.get(input, ["kernelgate", "saturated_models"], [])

# Per model in data: {"action": "fallback", "fallback": <model>, "retry_after_s": n} sends the
# request to the fallback model while it has room (else 429), {"action": "reject", ...} answers
# 429 with Retry-After at once. Without it a saturated model's servers queue or refuse (429).
_on_saturation := object.get(_model, "on_saturation", {})

_retry_after := format_int(_on_saturation.retry_after_s, 10) if {
	_non_negative_int(_on_saturation.retry_after_s)
} else := "1"

# The fallback serves the request only if it is a model of the route's kind that the tenant
# may use and that has room itself.
_fallback_name := _on_saturation.fallback if {
	_on_saturation.action == "fallback"
	is_string(_on_saturation.fallback)
	data.kernelgate.models[_on_saturation.fallback].kind == _route.kind
	_allowed_model(_on_saturation.fallback)
	not _saturated(_on_saturation.fallback)
}

_degraded := object.union(
	_allow(
		{"x-kernelgate-tenant": _tenant_name, "x-kernelgate-tier": _tier_name, "x-kernelgate-model": _fallback_name},
		{"requests": _model_limits.requests, "tokens": _model_limits.tokens, "unit": _unit(_model_limits)},
	),
	{
		"response_headers_to_add": {"x-kernelgate-degraded": "fallback", "x-kernelgate-served-model": _fallback_name},
		"reason": "degraded_fallback",
	},
) if {
	_fallback_name
} else := _deny(_p(
	429, "model_saturated",
	sprintf("The model `%s` is at capacity; retry in %s s.", [_model_name, _retry_after]),
	"model", {"retry-after": _retry_after},
))
