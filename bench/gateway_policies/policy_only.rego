# The policy both OPA-Envoy and kernelgate evaluate in bench/gateway.py's policy-only systems:
# it decides from a header, the path and the body alone (no identity, no rate limit).
package envoy.authz

import rego.v1

models := {"tiny-gpt2", "gpt2", "gpt2-medium", "opt-125m"}

default result := {"allowed": false, "http_status": 403, "body": "{\"error\":\"denied\"}"}

result := {"allowed": true, "headers": {"x-bench-user": user}} if {
	input.attributes.request.http.method == "POST"
	input.parsed_path[0] == "v1"
	input.parsed_path[1] in {"completions", "chat"}
	user := input.attributes.request.http.headers["x-user"]
	startswith(user, "user-")
	input.parsed_body.model in models
	input.parsed_body.max_tokens <= 256
}
