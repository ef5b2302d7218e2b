"""Span names and attribute keys: the one list every producer and the sampler import.

In: nothing (constants only; this module imports nothing, so anything may import it).
Out: the names the sidecar (``sidecar/authorizer.py``), the inference server
(``inference/api.py``, ``inference/serving.py``, ``inference/engine.py``, ``inference/tracing.py``)
and kernel capture (``otel/kernels/``) put on spans, and that ``otel/sampling.py`` matches on.

A new span or attribute gets its name here first. Keys that OpenTelemetry's semantic conventions
define (``http.*``, ``gen_ai.*``) are spelled as those conventions spell them
(tests/otel/test_names.py checks them against the ``opentelemetry-semantic-conventions`` package);
the project's own are under ``kernelgate.``. Renaming one here renames it for every producer and
for the sampler at once; what Jaeger users see is pinned by the tests that read spans back.
"""

from __future__ import annotations

# --- tracers (instrumentation scope names) -------------------------------------------------------
SIDECAR_TRACER = "kernelgate.sidecar"
INFERENCE_TRACER = "kernelgate.inference"
KERNELS_TRACER = "kernelgate.kernels"

# --- spans ------------------------------------------------------------------------------------------
# sidecar: one server span per ext_authz Check, its children when recorded
AUTHZ_CHECK_SPAN = "ext_authz.check"
IDENTITY_SPAN = "identity"
OPA_QUERY_SPAN = "opa.query"
RATELIMIT_SPAN = "ratelimit"
# the prompt counted by the inference server's /tokenize, when token budgets are priced exactly
PROMPT_COUNT_SPAN = "prompt.count"
# inference: the request's server span is named "<method> <route>" (http_server_span_name)
PREPROCESS_SPAN = "preprocess"
QUEUE_SPAN = "queue"
# one per forward pass, linked to every request of its batch; thinned by otel.sampling.StepThinningSampler
STEP_SPAN = "engine.step"
# kernel capture: one per captured forward pass, parent of its kernel spans (named after the kernel)
FORWARD_SPAN = "gpu.forward"


def http_server_span_name(method: str, route: str) -> str:
    """The server span of an HTTP request: ``POST /v1/completions`` (semantic conventions: method and route)."""
    return f"{method} {route}"


# --- attributes: semantic conventions -----------------------------------------------------------------
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"  # the model that served it (a fallback when degraded)
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"  # "input" | "output", on gen_ai.client.token.usage
ERROR_TYPE = "error.type"

# --- metrics: GenAI semantic conventions (inference/genai_metrics.py) -------------------------------------
METRIC_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
METRIC_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
METRIC_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
METRIC_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"

# --- attributes: the sidecar's check ---------------------------------------------------------------------
TENANT = "kernelgate.tenant"
MODEL_VERSION = "kernelgate.model.version"  # the version of the served model that answered (#15)
DECISION = "kernelgate.decision"
DECISION_ID = "kernelgate.decision_id"
REASON = "kernelgate.reason"
DENY_REASON = "kernelgate.deny_reason"
CACHE_HIT = "kernelgate.cache_hit"
POLICY_REVISION = "kernelgate.policy_revision"
RATELIMIT_BACKEND = "kernelgate.ratelimit.backend"
RATELIMIT_DEGRADED = "kernelgate.ratelimit.degraded"


def ratelimit_remaining(kind: str) -> str:
    """``kernelgate.ratelimit.<kind>.remaining``: what is left of one budget (requests, tokens) after a check."""
    return f"kernelgate.ratelimit.{kind}.remaining"


# --- attributes: the inference server's request span -------------------------------------------------------
REPLICA_ID = "kernelgate.replica.id"  # which replica served it (Envoy's upstream span has upstream_address)

# --- attributes: the engine's steps (engine.step, and copied onto gpu.forward) ------------------------------
STEP_INDEX = "kernelgate.step.index"
STEP_PHASE = "kernelgate.step.phase"  # "prefill" | "decode"; the sampler thins decode steps
STEP_BATCH_SIZE = "kernelgate.step.batch_size"
STEP_NUM_TOKENS = "kernelgate.step.num_tokens"
QUEUE_SLOT = "kernelgate.queue.slot"

# --- attributes: kernel capture ------------------------------------------------------------------------------
# on the request's server span: why its passes are captured ("ratio" | "forced")
KERNELS_CAPTURE = "kernelgate.kernels.capture"
# on gpu.forward
KERNELS_ACTIVITIES = "kernelgate.kernels.activities"  # "cuda" | "cpu"
KERNELS_RECORDER = "kernelgate.kernels.recorder"  # "cupti" | "torch.profiler"
KERNELS_COUNT = "kernelgate.kernels.count"
KERNELS_SPANS = "kernelgate.kernels.spans"
KERNELS_FOLDED = "kernelgate.kernels.folded"
KERNELS_DROPPED = "kernelgate.kernels.dropped"
KERNELS_CLAMPED = "kernelgate.kernels.clamped"
KERNELS_GPU_TIME_NS = "kernelgate.kernels.gpu_time_ns"
# on gpu.forward (this pass) and on the request's server span (its captured passes): the request's part of
# the passes' GPU time, divided among a pass's sequences by the tokens each put through it
GPU_REQUEST_SHARE_NS = "kernelgate.gpu.request_share_ns"
KERNELS_FIRST_START_NS = "kernelgate.kernels.first_start_ns"
KERNELS_LAST_END_NS = "kernelgate.kernels.last_end_ns"
CLOCK_UNCERTAINTY_NS = "kernelgate.clock.uncertainty_ns"
# how this pass's kernel spans were made: "recorded" (the recorder saw these kernels run in this pass) or
# "derived" (a CUDA graph replay timed with CUDA events, its kernels taken from one recorded replay of
# the same graph: otel/kernels/derive.py)
KERNELS_SOURCE = "kernelgate.kernels.source"
KERNELS_GRAPH_KEY = "kernelgate.kernels.graph_key"  # which captured decode graph the pass replayed
KERNELS_REPLAY_NS = "kernelgate.kernels.replay_ns"  # the replay's duration, between its two timing marks
# on a derived gpu.forward: the step index of the recorded pass its kernels come from (also a span link)
KERNELS_DERIVED_FROM_STEP = "kernelgate.kernels.derived_from.step_index"
# on each kernel span
GPU_KERNEL_NAME = "gpu.kernel.name"
GPU_DEVICE = "gpu.device"
GPU_STREAM = "gpu.stream"
KERNEL_COUNT = "kernelgate.kernel.count"
KERNEL_GPU_TIME_NS = "kernelgate.kernel.gpu_time_ns"
KERNEL_FOLDED = "kernelgate.kernel.folded"
KERNEL_DERIVED = "kernelgate.kernel.derived"  # True: placed from a recorded replay, not recorded in this one
