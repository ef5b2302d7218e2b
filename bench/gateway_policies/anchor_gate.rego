# The anchor stack's policy (Envoy + OPA-Envoy + envoyproxy/ratelimit): OPA-Envoy checks the API
# key itself (sha256 against data.keys) and returns the tenant as a header, which Envoy's
# ratelimit filter turns into the descriptor (tenant, model). Same allow rule as policy_only.rego.
package envoy.authz

import rego.v1

models := {"tiny-gpt2", "gpt2", "gpt2-medium", "opt-125m"}

default result := {"allowed": false, "http_status": 401, "body": "{\"error\":\"bad key\"}"}

tenant := data.keys[crypto.sha256(input.attributes.request.http.headers["x-api-key"])].tenant

result := {"allowed": true, "headers": {"x-tenant": tenant, "x-model": input.parsed_body.model}} if {
	input.attributes.request.http.method == "POST"
	input.parsed_path[0] == "v1"
	input.parsed_path[1] in {"completions", "chat"}
	input.parsed_body.model in models
	input.parsed_body.max_tokens <= 256
}
