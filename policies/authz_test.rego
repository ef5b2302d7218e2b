package envoy.authz_test

import data.envoy.authz

# ---------------------------------------------------------------------------
# Input builders (the shape the sidecar sends)
# ---------------------------------------------------------------------------

_identity(tenant, scopes) := {
	"authenticated": true,
	"method": "api_key",
	"tenant": tenant,
	"tier": null,
	"scopes": scopes,
	"subject": "key-1",
}

_anonymous := {
	"authenticated": false,
	"method": "anonymous",
	"tenant": null,
	"tier": null,
	"scopes": [],
	"subject": null,
}

_all_scopes := ["completions", "embeddings", "models"]

_acme := _identity("acme", _all_scopes)

_globex := _identity("globex", _all_scopes)

_hooli := _identity("hooli", _all_scopes)

_request(method, segments, identity) := {
	"attributes": {"request": {"http": {
		"id": "req-1",
		"method": method,
		"path": concat("", ["/", concat("/", segments)]),
		"host": "kernelgate.local",
		"scheme": "http",
		"protocol": "HTTP/1.1",
		"headers": {"content-type": "application/json"},
		"size": -1,
	}}},
	"parsed_path": segments,
	"parsed_query": {},
	"truncated_body": false,
	"version": {"encoding": "protojson", "ext_authz": "v3"},
	"identity": identity,
	"kernelgate": {"body_error": null, "estimated_tokens": 0},
}

_get(segments, identity) := _request("GET", segments, identity)

# A POST with a valid JSON object body; size is the body's length.
_post(segments, body, identity) := object.union(_request("POST", segments, identity), {
	"attributes": {"request": {"http": {"body": json.marshal(body), "size": count(json.marshal(body))}}},
	"parsed_body": body,
	"kernelgate": {"body_error": null, "estimated_tokens": 10},
})

_chat := ["v1", "chat", "completions"]

_completions := ["v1", "completions"]

_embeddings := ["v1", "embeddings"]

_models := ["v1", "models"]

_chat_body(model) := {"model": model, "messages": [{"role": "user", "content": "hi"}]}

# A denial with this status and reason, a JSON content type, and an OpenAI-shaped
# error body whose code is the reason and whose message is a non-empty string.
_denied(r, status, reason) if {
	r.allowed == false
	r.http_status == status
	r.reason == reason
	r.headers["content-type"] == "application/json"
	not r.rate_limit
	e := json.unmarshal(r.body).error
	e.code == reason
	is_string(e.message)
	e.message != ""
	"type" in object.keys(e)
	"param" in object.keys(e)
}

_message(r) := json.unmarshal(r.body).error.message

# ---------------------------------------------------------------------------
# 1. Public paths
# ---------------------------------------------------------------------------

test_healthz_public_for_anonymous if {
	r := authz.result with input as _get(["healthz"], _anonymous)
	r.allowed == true
	r.reason == "public"
	not r.rate_limit
}

test_readyz_public_without_identity if {
	# No identity at all (e.g. the OPA-Envoy rival's input) is still fine here.
	r := authz.result with input as object.remove(_get(["readyz"], _anonymous), ["identity"])
	r.allowed == true
	r.reason == "public"
	not r.rate_limit
}

test_healthz_wrong_method_is_405 if {
	r := authz.result with input as _request("POST", ["healthz"], _anonymous)
	_denied(r, 405, "method_not_allowed")
	r.headers.allow == "GET"
}

# ---------------------------------------------------------------------------
# 2. Routes and methods
# ---------------------------------------------------------------------------

test_unknown_route_is_404 if {
	r := authz.result with input as _get(["v1", "files"], _acme)
	_denied(r, 404, "route_not_found")
	_message(r) == "Invalid URL (GET /v1/files)"
}

test_anonymous_unknown_route_is_404_not_401 if {
	# Priority: the route check runs before the credentials check.
	r := authz.result with input as _get(["admin"], _anonymous)
	_denied(r, 404, "route_not_found")
	not r.headers["www-authenticate"]
}

test_sub_path_of_known_route_is_404 if {
	r := authz.result with input as _get(["v1", "models", "tiny-gpt2"], _acme)
	_denied(r, 404, "route_not_found")
}

test_encoded_slash_does_not_match_route if {
	# "/v1/chat%2Fcompletions" decodes to the single segment "chat/completions".
	r := authz.result with input as _post(["v1", "chat/completions"], _chat_body("tiny-gpt2"), _acme)
	_denied(r, 404, "route_not_found")
}

test_empty_input_is_404 if {
	r := authz.result with input as {}
	_denied(r, 404, "route_not_found")
}

test_get_on_chat_is_405_with_allow if {
	r := authz.result with input as _get(_chat, _acme)
	_denied(r, 405, "method_not_allowed")
	r.headers.allow == "POST"
}

test_post_on_models_is_405_with_allow if {
	r := authz.result with input as _post(_models, {}, _acme)
	_denied(r, 405, "method_not_allowed")
	r.headers.allow == "GET"
}

test_anonymous_wrong_method_is_405_not_401 if {
	r := authz.result with input as _get(_embeddings, _anonymous)
	_denied(r, 405, "method_not_allowed")
}

# ---------------------------------------------------------------------------
# 3. Credentials
# ---------------------------------------------------------------------------

test_anonymous_is_401_with_challenge if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _anonymous)
	_denied(r, 401, "missing_credentials")
	r.headers["www-authenticate"] == `Bearer realm="kernelgate"`
	json.unmarshal(r.body).error.type == "authentication_error"
}

test_missing_identity_is_401 if {
	r := authz.result with input as object.remove(_get(_models, _acme), ["identity"])
	_denied(r, 401, "missing_credentials")
}

test_authenticated_must_be_boolean_true if {
	r := authz.result with input as _get(_models, object.union(_acme, {"authenticated": "true"}))
	_denied(r, 401, "missing_credentials")
}

test_anonymous_beats_body_errors if {
	inp := object.union(_post(_chat, {}, _anonymous), {"kernelgate": {"body_error": "too_large"}})
	r := authz.result with input as inp
	_denied(r, 401, "missing_credentials")
}

# ---------------------------------------------------------------------------
# 4. Tenant
# ---------------------------------------------------------------------------

test_unknown_tenant_is_403 if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _identity("umbrella", _all_scopes))
	_denied(r, 403, "tenant_not_allowed")
	json.unmarshal(r.body).error.type == "permission_error"
}

test_null_tenant_is_403 if {
	r := authz.result with input as _get(_models, _identity(null, _all_scopes))
	_denied(r, 403, "tenant_not_allowed")
}

test_disabled_tenant_is_403 if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _identity("initech", _all_scopes))
	_denied(r, 403, "tenant_not_allowed")
}

test_tenant_with_unknown_tier_is_403 if {
	r := authz.result with input as _get(_models, _acme)
		with data.kernelgate.tenants.acme as {"tier": "platinum", "models": ["*"]}
	_denied(r, 403, "tenant_not_allowed")
}

# ---------------------------------------------------------------------------
# 5. Scopes
# ---------------------------------------------------------------------------

test_missing_completions_scope_is_403 if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _identity("acme", ["embeddings"]))
	_denied(r, 403, "missing_scope")
	contains(_message(r), "'completions'")
}

test_missing_embeddings_scope_is_403 if {
	inp := _post(_embeddings, {"model": "all-minilm-l6-v2", "input": "x"}, _identity("acme", ["completions"]))
	r := authz.result with input as inp
	_denied(r, 403, "missing_scope")
}

test_missing_models_scope_is_403 if {
	r := authz.result with input as _get(_models, _identity("acme", ["completions"]))
	_denied(r, 403, "missing_scope")
}

test_wildcard_scope_grants_all if {
	r1 := authz.result with input as _post(_completions, {"model": "opt-1.3b", "prompt": "x"}, _identity("acme", ["*"]))
	r1.allowed == true
	r2 := authz.result with input as _get(_models, _identity("acme", ["*"]))
	r2.allowed == true
}

test_missing_scope_beats_bad_body if {
	inp := object.union(_post(_chat, {}, _identity("acme", [])), {"kernelgate": {"body_error": "invalid_json"}})
	r := authz.result with input as inp
	_denied(r, 403, "missing_scope")
}

# ---------------------------------------------------------------------------
# 6. Bodies
# ---------------------------------------------------------------------------

test_sidecar_too_large_is_413 if {
	inp := object.union(_post(_chat, {}, _acme), {"kernelgate": {"body_error": "too_large"}})
	r := authz.result with input as object.remove(inp, ["parsed_body"])
	_denied(r, 413, "body_too_large")
}

test_truncated_body_is_413 if {
	inp := object.union(_post(_chat, _chat_body("tiny-gpt2"), _acme), {"truncated_body": true})
	r := authz.result with input as inp
	_denied(r, 413, "body_too_large")
}

test_size_over_tier_limit_is_413 if {
	# 70000 bytes: over free's 65536, under pro's 1 MiB.
	big := {"attributes": {"request": {"http": {"size": 70000}}}}
	r1 := authz.result with input as object.union(_post(_chat, _chat_body("tiny-gpt2"), _globex), big)
	_denied(r1, 413, "body_too_large")
	contains(_message(r1), "65536 bytes")
	r2 := authz.result with input as object.union(_post(_chat, _chat_body("tiny-gpt2"), _acme), big)
	r2.allowed == true
}

test_body_bytes_counted_when_size_unknown if {
	# size -1: the policy counts bytes, not characters ("é" is 2 bytes in UTF-8).
	body := {"model": "tiny-gpt2", "prompt": concat("", [c | some _ in numbers.range(1, 33000); c := "é"])}
	inp := object.union(_post(_completions, body, _globex), {"attributes": {"request": {"http": {"size": -1}}}})
	count(inp.attributes.request.http.body) < 65536
	r := authz.result with input as inp
	_denied(r, 413, "body_too_large")
}

test_too_large_beats_invalid_json if {
	inp := object.union(_post(_chat, {}, _acme), {"truncated_body": true, "kernelgate": {"body_error": "invalid_json"}})
	r := authz.result with input as object.remove(inp, ["parsed_body"])
	_denied(r, 413, "body_too_large")
}

test_invalid_json_is_400 if {
	inp := object.union(_request("POST", _chat, _acme), {
		"attributes": {"request": {"http": {"body": "{\"model\": ", "size": 10}}},
		"kernelgate": {"body_error": "invalid_json", "estimated_tokens": 0},
	})
	r := authz.result with input as inp
	_denied(r, 400, "invalid_json")
	json.unmarshal(r.body).error.type == "invalid_request_error"
}

test_not_an_object_is_400 if {
	inp := object.union(_request("POST", _chat, _acme), {
		"attributes": {"request": {"http": {"body": "[1]", "size": 3}}},
		"parsed_body": [1],
		"kernelgate": {"body_error": "not_an_object", "estimated_tokens": 0},
	})
	r := authz.result with input as inp
	_denied(r, 400, "invalid_json")
	contains(_message(r), "JSON object")
}

test_no_body_is_400_invalid_json if {
	r := authz.result with input as _request("POST", _chat, _acme)
	_denied(r, 400, "invalid_json")
}

test_missing_model_is_400 if {
	r := authz.result with input as _post(_chat, {"messages": []}, _acme)
	_denied(r, 400, "missing_model")
	json.unmarshal(r.body).error.param == "model"
}

test_non_string_model_is_400 if {
	r1 := authz.result with input as _post(_chat, {"model": 7}, _acme)
	_denied(r1, 400, "missing_model")
	r2 := authz.result with input as _post(_chat, {"model": ""}, _acme)
	_denied(r2, 400, "missing_model")
}

# ---------------------------------------------------------------------------
# 7. Models
# ---------------------------------------------------------------------------

test_unknown_model_is_404 if {
	r := authz.result with input as _post(_chat, _chat_body("gpt-5"), _acme)
	_denied(r, 404, "model_not_found")
	e := json.unmarshal(r.body).error
	e.type == "invalid_request_error"
	e.code == "model_not_found"
	contains(e.message, "`gpt-5`")
}

test_model_not_in_tenant_list_is_403 if {
	r := authz.result with input as _post(_chat, _chat_body("gpt2-medium"), _globex)
	_denied(r, 403, "model_not_allowed")
}

test_tenant_list_overrides_tier_list if {
	# globex's own list is ["tiny-gpt2"], though its tier (free) also allows the embedder.
	inp := _post(_embeddings, {"model": "all-minilm-l6-v2", "input": "x"}, _globex)
	r := authz.result with input as inp
	_denied(r, 403, "model_not_allowed")
}

test_tier_list_applies_without_tenant_list if {
	# hooli has no list of its own: free's list allows the embedder but not gpt2-medium.
	r1 := authz.result with input as _post(_embeddings, {"model": "all-minilm-l6-v2", "input": "x"}, _hooli)
	r1.allowed == true
	r2 := authz.result with input as _post(_chat, _chat_body("gpt2-medium"), _hooli)
	_denied(r2, 403, "model_not_allowed")
}

test_no_model_list_anywhere_denies if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _hooli)
		with data.kernelgate.tiers.free as {"max_tokens": 256, "max_body_bytes": 65536, "limits": {"requests": 1, "tokens": 1}}
	_denied(r, 403, "model_not_allowed")
}

test_generate_model_on_embeddings_is_400 if {
	r := authz.result with input as _post(_embeddings, {"model": "tiny-gpt2", "input": "x"}, _acme)
	_denied(r, 400, "wrong_model_kind")
}

test_embed_model_on_chat_is_400 if {
	r := authz.result with input as _post(_chat, _chat_body("all-minilm-l6-v2"), _acme)
	_denied(r, 400, "wrong_model_kind")
}

# ---------------------------------------------------------------------------
# 8. max_tokens
# ---------------------------------------------------------------------------

test_invalid_max_tokens_is_400 if {
	every bad in ["100", -1, 1.5, true, {}] {
		r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": bad}), _acme)
		_denied(r, 400, "invalid_max_tokens")
		json.unmarshal(r.body).error.param == "max_tokens"
	}
}

test_invalid_max_completion_tokens_is_400 if {
	body := object.union(_chat_body("tiny-gpt2"), {"max_completion_tokens": "lots"})
	r := authz.result with input as _post(_chat, body, _acme)
	_denied(r, 400, "invalid_max_tokens")
	json.unmarshal(r.body).error.param == "max_completion_tokens"
}

test_null_max_tokens_is_absent if {
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": null}), _acme)
	r.allowed == true
}

test_max_tokens_over_ceiling_names_ceiling if {
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 300}), _globex)
	_denied(r, 400, "max_tokens_over_ceiling")
	contains(_message(r), "256")
}

test_max_tokens_sent_as_a_whole_float_reads_as_an_integer if {
	body := object.union(_chat_body("tiny-gpt2"), json.unmarshal(`{"max_tokens": 257.0}`))
	r := authz.result with input as _post(_chat, body, _globex)
	_denied(r, 400, "max_tokens_over_ceiling")
	contains(_message(r), "too large: 257. The ceiling")
}

test_max_tokens_from_2_pow_31_is_invalid if {
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 2147483648}), _globex)
	_denied(r, 400, "invalid_max_tokens")
	s := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 2147483647}), _globex)
	_denied(s, 400, "max_tokens_over_ceiling")
}

test_max_tokens_at_ceiling_is_allowed if {
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 256}), _globex)
	r.allowed == true
}

test_max_completion_tokens_over_pro_ceiling if {
	body := object.union(_chat_body("opt-1.3b"), {"max_completion_tokens": 5000})
	r := authz.result with input as _post(_chat, body, _acme)
	_denied(r, 400, "max_tokens_over_ceiling")
	contains(_message(r), "4096")
	json.unmarshal(r.body).error.param == "max_completion_tokens"
}

test_invalid_beats_over_ceiling if {
	body := object.union(_chat_body("tiny-gpt2"), {"max_tokens": 100000, "max_completion_tokens": -5})
	r := authz.result with input as _post(_chat, body, _globex)
	_denied(r, 400, "invalid_max_tokens")
}

test_credential_tier_is_ignored if {
	# globex's credential claims "pro"; the data says free, so 300 > 256 is refused.
	ident := object.union(_globex, {"tier": "pro"})
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 300}), ident)
	_denied(r, 400, "max_tokens_over_ceiling")
}

# ---------------------------------------------------------------------------
# 9. Allowed
# ---------------------------------------------------------------------------

test_allow_chat_with_headers_and_tier_limits if {
	body := object.union(_chat_body("tiny-gpt2"), {"max_tokens": 4096})
	r := authz.result with input as _post(_chat, body, _acme)
	r.allowed == true
	r.http_status == 200
	r.reason == "ok"
	r.headers == {"x-kernelgate-tenant": "acme", "x-kernelgate-tier": "pro", "x-kernelgate-model": "tiny-gpt2"}
	r.rate_limit == {"requests": 600, "tokens": 400000, "unit": "minute"}
}

test_allow_completions_free_tier if {
	r := authz.result with input as _post(_completions, {"model": "tiny-gpt2", "prompt": "x"}, _globex)
	r.allowed == true
	r.headers["x-kernelgate-tier"] == "free"
	r.rate_limit == {"requests": 60, "tokens": 20000, "unit": "minute"}
}

test_allow_embeddings if {
	r := authz.result with input as _post(_embeddings, {"model": "all-minilm-l6-v2", "input": "x"}, _acme)
	r.allowed == true
	r.headers["x-kernelgate-model"] == "all-minilm-l6-v2"
}

test_per_tenant_model_limit_override if {
	# data.json: acme's gpt2-medium budget is 120 requests / 50000 tokens; unit from the tier.
	r := authz.result with input as _post(_chat, _chat_body("gpt2-medium"), _acme)
	r.allowed == true
	r.rate_limit == {"requests": 120, "tokens": 50000, "unit": "minute"}
}

test_per_tenant_wildcard_and_model_overrides_layer if {
	limits := {"*": {"requests": 10, "unit": "hour"}, "tiny-gpt2": {"tokens": 99}}
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _globex)
		with data.kernelgate.tenants.globex.limits as limits
	r.rate_limit == {"requests": 10, "tokens": 99, "unit": "hour"}
}

test_allow_models_list_requests_only if {
	r := authz.result with input as _get(_models, _identity("globex", ["models"]))
	r.allowed == true
	r.reason == "ok"
	r.headers == {"x-kernelgate-tenant": "globex", "x-kernelgate-tier": "free"}
	r.rate_limit == {"requests": 60, "unit": "minute"}
}

# ---------------------------------------------------------------------------
# Default
# ---------------------------------------------------------------------------

test_tier_without_budget_is_refused if {
	# A tier lacking limits is a config error: refused, never allowed without a budget.
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _acme)
		with data.kernelgate.tiers.pro as {"max_tokens": 4096, "max_body_bytes": 1048576, "models": ["*"]}
	_denied(r, 403, "tenant_not_allowed")
}

test_tier_without_ceiling_is_refused if {
	# Without max_tokens the ceiling check could not run: refuse instead.
	tier := {"max_body_bytes": 1048576, "models": ["*"], "limits": {"requests": 1, "tokens": 1}}
	r := authz.result with input as _post(_chat, object.union(_chat_body("tiny-gpt2"), {"max_tokens": 999999}), _acme)
		with data.kernelgate.tiers.pro as tier
	_denied(r, 403, "tenant_not_allowed")
}

test_model_without_kind_is_refused if {
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _acme)
		with data.kernelgate.models["tiny-gpt2"] as {}
	_denied(r, 400, "wrong_model_kind")
	contains(_message(r), "unknown model")
}

test_default_deny_when_nothing_matches if {
	# A route with no outcome of its own (no kind, not the models list) falls to the default.
	routes := [{"id": "odd", "path": ["odd"], "methods": ["GET"], "scope": "models"}]
	r := authz.result with input as _get(["odd"], _acme)
		with authz._routes as routes
	_denied(r, 403, "denied")
}

test_tokenize_costs_requests_only if {
	# Routes that run no model name no token budget; /metrics is not a route through Envoy (404).
	t := authz.result with input as _post(["tokenize"], {"model": "tiny-gpt2", "prompt": "x"}, _acme)
	t.allowed == true
	t.rate_limit == {"requests": 600, "unit": "minute"}
	m := authz.result with input as _get(["metrics"], _acme)
	m.allowed == false
}

test_token_accounting_options_pass_through if {
	limits := {"requests": 10, "tokens": 500, "unit": "hour", "concurrency": 2, "output_weight": 3, "enforce_midstream": true}
	r := authz.result with input as _post(_chat, _chat_body("tiny-gpt2"), _globex)
		with data.kernelgate.tiers.free.limits as limits
	r.rate_limit == {"requests": 10, "tokens": 500, "unit": "hour", "concurrency": 2, "output_weight": 3, "enforce_midstream": true}
}

# ---------------------------------------------------------------------------
# Degradation: every replica of the model saturated
# ---------------------------------------------------------------------------

_saturated_input(model, saturated, identity) := object.union(_post(_chat, _chat_body(model), identity), {
	"kernelgate": {"body_error": null, "estimated_tokens": 10, "saturated_models": saturated},
})

test_saturated_model_with_fallback_goes_to_the_fallback if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["gpt2-medium"], _acme)
	r.allowed == true
	r.reason == "degraded_fallback"
	r.headers["x-kernelgate-model"] == "tiny-gpt2"
	r.response_headers_to_add == {"x-kernelgate-degraded": "fallback", "x-kernelgate-served-model": "tiny-gpt2"}
	is_number(r.rate_limit.tokens)
}

test_saturated_model_whose_fallback_is_saturated_is_429_with_retry_after if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["gpt2-medium", "tiny-gpt2"], _acme)
	_denied(r, 429, "model_saturated")
	r.headers["retry-after"] == "2"
	json.unmarshal(r.body).error.type == "rate_limit_error"
}

test_saturated_model_set_to_reject_is_429_at_once if {
	r := authz.result with input as _saturated_input("tiny-gpt2", ["tiny-gpt2"], _acme)
	_denied(r, 429, "model_saturated")
	r.headers["retry-after"] == "1"
}

test_fallback_the_tenant_may_not_use_is_429 if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["gpt2-medium"], _acme)
		with data.kernelgate.tenants.acme.models as ["gpt2-medium"]
	_denied(r, 429, "model_saturated")
}

test_fallback_of_another_kind_is_429 if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["gpt2-medium"], _acme)
		with data.kernelgate.models["gpt2-medium"].on_saturation as {"action": "fallback", "fallback": "all-minilm-l6-v2", "retry_after_s": 3}
	_denied(r, 429, "model_saturated")
	r.headers["retry-after"] == "3"
}

test_saturation_without_a_configured_action_is_allowed if {
	r := authz.result with input as _saturated_input("opt-1.3b", ["opt-1.3b"], _acme)
	r.allowed == true
	r.headers["x-kernelgate-model"] == "opt-1.3b"
}

test_other_models_saturation_changes_nothing if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["tiny-gpt2"], _acme)
	r.allowed == true
	r.reason == "ok"
	r.headers["x-kernelgate-model"] == "gpt2-medium"
}

test_checks_come_before_degradation if {
	r := authz.result with input as _saturated_input("gpt2-medium", ["gpt2-medium"], _globex)
	_denied(r, 403, "model_not_allowed")
}

# ---------------------------------------------------------------------------
# Canary: rollout weights pick the version (x-kernelgate-model-version)
# ---------------------------------------------------------------------------

_session(key) := object.union(_post(_chat, _chat_body("tiny-gpt2"), _acme), {
	"attributes": {"request": {"http": {"headers": {"content-type": "application/json", "x-session-id": key}}}},
})

_picked(inp, rollout) := v if {
	r := authz.result with input as inp with data.kernelgate.rollouts as {"tiny-gpt2": rollout}
	r.allowed == true
	v := object.get(r.headers, "x-kernelgate-model-version", "none")
}

test_no_rollout_no_version_header if {
	r := authz.result with input as _session("s1")
	r.allowed == true
	not "x-kernelgate-model-version" in object.keys(r.headers)
}

test_all_weight_on_one_version_picks_it if {
	_picked(_session("s1"), {"weights": {"v1": 0, "v2": 7}}) == "v2"
	_picked(_session("s2"), {"weights": {"v1": 100}}) == "v1"
}

test_every_weight_zero_no_version_header if {
	_picked(_session("s1"), {"weights": {"v1": 0, "v2": 0}}) == "none"
}

test_same_key_same_version_and_a_split_follows_the_weights if {
	rollout := {"weights": {"v1": 80, "v2": 20}}
	picks := [_picked(_session(sprintf("session-%d", [i])), rollout) | some i in numbers.range(1, 100)]
	canary := count([p | some p in picks; p == "v2"])

	# 100 keys at p = 0.2: mean 20, sd 4; 4.5 sd either side (tests/e2e/test_canary.py: more keys).
	canary >= 2
	canary <= 38
	count([p | some p in picks; p == "v1"]) == 100 - canary
	_picked(_session("session-7"), rollout) == picks[6]
}

test_tenant_weights_win_over_the_models if {
	rollout := {"weights": {"v1": 100, "v2": 0}, "tenants": {"acme": {"v1": 0, "v2": 1}}}
	_picked(_session("s1"), rollout) == "v2"
	_picked(
		object.union(_session("s1"), {"identity": _identity("hooli", _all_scopes), "parsed_body": {
			"model": "tiny-gpt2",
			"messages": [{"role": "user", "content": "hi"}],
		}}),
		rollout,
	) == "v1"
}

test_without_a_session_the_user_field_then_the_tenant_is_the_key if {
	rollout := {"weights": {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1, "g": 1, "h": 1}}
	by_user := [_picked(_post(_chat, object.union(_chat_body("tiny-gpt2"), {"user": sprintf("u%d", [i])}), _acme), rollout) |
		some i in numbers.range(1, 40)
	]
	count({p | some p in by_user}) > 1
	by_tenant := {_picked(_post(_chat, _chat_body("tiny-gpt2"), _acme), rollout) | some _ in numbers.range(1, 5)}
	count(by_tenant) == 1
}
