# kernelgate's full gate in bench/gateway.py: the sidecar authenticates the API key itself
# (input.identity) and charges Redis budgets per (tenant, model, route) that are never reached;
# same allow rule as policy_only.rego and anchor_gate.rego.
package envoy.authz

import rego.v1

models := {"tiny-gpt2", "gpt2", "gpt2-medium", "opt-125m"}

default result := {"allowed": false, "http_status": 401, "body": "{\"error\":\"no identity\"}"}

result := {"allowed": true, "headers": {"x-model": input.parsed_body.model},
           "rate_limit": {"requests": 1000000000, "unit": "minute"}} if {
	input.identity.tenant != ""
	input.attributes.request.http.method == "POST"
	input.parsed_path[0] == "v1"
	input.parsed_path[1] in {"completions", "chat"}
	input.parsed_body.model in models
	input.parsed_body.max_tokens <= 256
}
