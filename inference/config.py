"""Typed configuration of the inference server.

Filled by the one loader, ``kernelgate.config.load`` (the ``inference:`` section); every
value is checked here, at start-up, so a bad config file fails before a model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from common.ports import INFERENCE_ADMIN_PORT, INFERENCE_PORT, LOOPBACK
from common.settings import require

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Decoder = Literal["auto", "fused", "hf"]
Ops = Literal["auto", "torch", "triton", "deepspeed"]
Numerics = Literal["default", "tp_invariant"]


@dataclass(frozen=True)
class ListenConfig:
    """Where the HTTP front end listens."""

    host: str = LOOPBACK
    port: int = INFERENCE_PORT

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, f"listen.port must be 0..65535, got {self.port}")


@dataclass(frozen=True)
class ModelConfig:
    """Which generative model to serve and how to run it.

    ``path`` names a local Hugging Face directory (config, safetensors, tokenizer); without
    it a random-weight model is built from the named architecture ``random_config``
    (seeded), which is how tests and the GPU benchmark run with no download.
    ``cpu_threads`` bounds torch's intra-op threads when serving on CPU: small decode steps
    gain nothing from more, and spinning OpenMP workers starve the event loop.
    ``decoder``: ``fused`` runs Llama-family models (llama, qwen2, mistral) on kernelgate's
    decoder (``inference/llama.py``: fused projections, GQA over the slot cache, tensor
    parallel), ``hf`` on Hugging Face layers (DeepSpeed-injected when ``use_deepspeed``);
    ``auto`` picks ``fused`` where it applies. ``ops`` picks the fused decoder's elementwise
    kernels (``inference/ops.py``): ``triton``, ``deepspeed`` (its transformer_inference
    kernels, JIT-built) or ``torch``; ``auto`` is Triton on CUDA, torch on CPU. ``triton`` and
    ``deepspeed`` also write the key/value cache from the rotary kernel and run a decode step's
    attention as one Triton kernel per layer; ``torch`` keeps ``index_put`` and SDPA.
    ``tp_size`` > 1 shards the fused decoder over that many processes (one GPU each; the
    server starts the other ranks itself). ``tp_timeout_s`` bounds every wait on the other
    ranks (one step, the graph capture, the stop): past it the server logs which wait hung,
    ends the other ranks and turns not ready.
    ``numerics``: ``default`` computes each rank's slice of a layer as one GEMM per projection
    and sums the ranks' partial products with the collective's own (unspecified) order, so
    ``tp_size`` N and 1 agree only within rounding (a near-tied greedy token can flip).
    ``tp_invariant`` (fused decoder only) computes every layer as the same ``numerics_shards``
    shards at every ``tp_size`` (a rank runs its share of them): one GEMM and one attention call
    per shard, each shard's output-projection partial kept fp32, the partials gathered and summed
    in shard order; logits are then bitwise equal for every ``tp_size`` that divides the shard
    count (same GPU model, same software). It costs more launches and smaller GEMMs (the
    "Tensor-parallel numerics" section of docs/architecture.md). ``numerics_shards`` 0 picks the
    largest of 8, 4, 2, 1 that divides the model's attention heads, key/value heads and MLP width;
    set it explicitly (the same value on every deployment that must agree) to pay for fewer shards.
    """

    name: str = "tiny-gpt2"
    path: str | None = None
    random_config: str = "tiny-gpt2"
    seed: int = 0
    dtype: DType = "auto"
    device: Device = "auto"
    use_deepspeed: bool = True
    kernel_inject: bool = True
    tp_size: int = 1
    tp_timeout_s: float = 120.0
    cuda_graphs: bool = True
    decoder: Decoder = "auto"
    ops: Ops = "auto"
    max_model_len: int | None = None
    cpu_threads: int = 1
    numerics: Numerics = "default"
    numerics_shards: int = 0

    def __post_init__(self) -> None:
        require(bool(self.name), "model.name must not be empty")
        require(self.cpu_threads >= 0, f"model.cpu_threads must be >= 0 (0: torch's default), got {self.cpu_threads}")
        require(self.tp_size >= 1, f"model.tp_size must be >= 1, got {self.tp_size}")
        require(self.tp_timeout_s > 0, f"model.tp_timeout_s must be > 0, got {self.tp_timeout_s}")
        require(self.numerics_shards >= 0, f"model.numerics_shards must be >= 0, got {self.numerics_shards}")
        require(self.numerics == "tp_invariant" or not self.numerics_shards,
                "model.numerics_shards applies to model.numerics 'tp_invariant' only")
        require(not self.numerics_shards or self.numerics_shards % self.tp_size == 0,
                f"model.numerics_shards ({self.numerics_shards}) must be a multiple of model.tp_size ({self.tp_size})")
        require(self.max_model_len is None or self.max_model_len >= 2,
                f"model.max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class BatchingConfig:
    """Bounds of the continuous batch and of the waiting queue in front of it.

    ``pipeline_decode``: launch decode step N+1 before reading step N's tokens (they feed the
    next step on the device), so the host's per-step work overlaps the device's step instead
    of leaving it idle. Tokens are the same either way; steps that cannot be launched early
    (a grammar-constrained sequence, a step that admits, retires or aborts a sequence, kernel
    tracing attached) run one at a time. ``false``: always one at a time.
    """

    max_batch_size: int = 16
    max_tokens_in_flight: int = 65536
    max_wait_ms: float = 2.0
    max_queue: int = 256
    pipeline_decode: bool = True

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        require(self.max_tokens_in_flight >= 1,
                f"batching.max_tokens_in_flight must be >= 1, got {self.max_tokens_in_flight}")
        require(self.max_wait_ms >= 0, f"batching.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        require(self.max_queue >= 0, f"batching.max_queue must be >= 0, got {self.max_queue}")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits enforced by the HTTP layer."""

    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        require(self.max_body_bytes >= 1, f"limits.max_body_bytes must be >= 1, got {self.max_body_bytes}")
        require(self.request_timeout_s > 0, f"limits.request_timeout_s must be > 0, got {self.request_timeout_s}")
        require(self.drain_timeout_s >= 0, f"limits.drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        require(self.retry_after_s >= 0, f"limits.retry_after_s must be >= 0, got {self.retry_after_s}")


@dataclass(frozen=True)
class EmbeddingsConfig:
    """The encoder behind ``/v1/embeddings``; ``path`` None means the packaged all-MiniLM-L6-v2."""

    enabled: bool = False
    name: str = "all-minilm-l6-v2"
    path: str | None = None
    device: Device = "auto"
    max_inputs: int = 256

    def __post_init__(self) -> None:
        require(bool(self.name), "embeddings.name must not be empty")
        require(self.max_inputs >= 1, f"embeddings.max_inputs must be >= 1, got {self.max_inputs}")


@dataclass(frozen=True)
class FaultConfig:
    """Faults a version injects into its own responses, to rehearse a bad rollout (like Envoy's
    fault filter): ``error_rate`` of its generation requests answer 500 ``injected_fault``,
    and every one waits ``first_token_delay_ms`` before it is queued (a slower first token).
    Off by default; a test and a drill knob, not for a version that serves users."""

    error_rate: float = 0.0
    first_token_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        require(0.0 <= self.error_rate <= 1.0, f"faults.error_rate must be in 0..1, got {self.error_rate}")
        require(self.first_token_delay_ms >= 0,
                f"faults.first_token_delay_ms must be >= 0, got {self.first_token_delay_ms}")

    @property
    def any(self) -> bool:
        return self.error_rate > 0 or self.first_token_delay_ms > 0


@dataclass(frozen=True)
class VersionConfig:
    """One version of a served model: a local Hugging Face directory (``path``) or a named
    random-weight architecture (``random_config`` + ``seed``)."""

    version: str
    path: str | None = None
    random_config: str = "tiny-gpt2"
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        require(bool(self.version) and "/" not in self.version,
                f"version must be a non-empty name without '/', got {self.version!r}")


@dataclass(frozen=True)
class ServedModelConfig:
    """A model the server answers to by ``name``, with its versions (``active`` serves at start;
    default the first), its own batch slots and limits. Everything else about running it
    (device, dtype, decoder, ...) comes from the ``model`` section."""

    name: str
    versions: tuple[VersionConfig, ...]
    active: str | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.name), "name must not be empty")
        require(len(self.versions) >= 1, f"model {self.name!r} needs at least one version")
        names = [v.version for v in self.versions]
        require(len(set(names)) == len(names), f"model {self.name!r} lists a version twice: {names}")
        require(self.active is None or self.active in names,
                f"active version {self.active!r} of model {self.name!r} is not one of {names}")

    @property
    def active_version(self) -> str:
        return self.active or self.versions[0].version


@dataclass(frozen=True)
class AdminConfig:
    """The model-lifecycle admin API: its own port, loopback by default, never routed by Envoy.

    The bearer token is read from ``token_file`` or else the ``token_env`` variable; with
    neither set the admin API is not started.
    """

    enabled: bool = True
    host: str = LOOPBACK
    port: int = INFERENCE_ADMIN_PORT
    token_file: str | None = None
    token_env: str = "KERNELGATE_ADMIN_TOKEN"

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, f"admin.port must be 0..65535, got {self.port}")


@dataclass(frozen=True)
class ValidationConfig:
    """How a newly loaded version is checked before it may be activated.

    A probe generation of ``probe_tokens`` tokens must run; then up to ``shadow_samples`` of
    the model's ``recent_prompts`` most recent live prompts run greedily on the candidate and
    on the active version: the share of prompts whose ``shadow_tokens`` outputs agree exactly
    must be at least ``min_agreement``, and the candidate's mean latency at most
    ``max_latency_ratio`` times the active one's. ``memory_headroom`` is the fraction of free
    memory a load may use (weights + KV cache estimate).
    """

    probe_tokens: int = 4
    shadow_samples: int = 8
    shadow_tokens: int = 8
    recent_prompts: int = 64
    min_agreement: float = 0.0
    max_latency_ratio: float = 3.0
    timeout_s: float = 120.0
    memory_headroom: float = 0.9

    def __post_init__(self) -> None:
        require(self.probe_tokens >= 1, f"validation.probe_tokens must be >= 1, got {self.probe_tokens}")
        require(self.shadow_samples >= 0, f"validation.shadow_samples must be >= 0, got {self.shadow_samples}")
        require(self.shadow_tokens >= 1, f"validation.shadow_tokens must be >= 1, got {self.shadow_tokens}")
        require(self.recent_prompts >= 0, f"validation.recent_prompts must be >= 0, got {self.recent_prompts}")
        require(0.0 <= self.min_agreement <= 1.0,
                f"validation.min_agreement must be in 0..1, got {self.min_agreement}")
        require(self.max_latency_ratio > 0, f"validation.max_latency_ratio must be > 0, got {self.max_latency_ratio}")
        require(self.timeout_s > 0, f"validation.timeout_s must be > 0, got {self.timeout_s}")
        require(0.0 < self.memory_headroom <= 1.0,
                f"validation.memory_headroom must be in (0, 1], got {self.memory_headroom}")


@dataclass(frozen=True)
class RollbackConfig:
    """Automatic rollback of a canary (a validated version that serves the requests the policy
    routes to it while another is active; docs/models.md).

    Over the last ``window_s`` seconds, once the canary and the active (stable) version have each
    answered ``min_requests`` generation requests, the canary is rolled back when its error rate
    exceeds the stable one's by more than ``max_error_rate_increase`` (absolute), or its median
    time to first token exceeds ``max_ttft_ratio`` x the stable one's. An error is a response
    that did not complete for a server-side reason (5xx, engine failure, timeout); a client
    that leaves or a 4xx does not count.
    """

    enabled: bool = True
    window_s: float = 60.0
    min_requests: int = 20
    max_error_rate_increase: float = 0.05
    max_ttft_ratio: float = 2.0

    def __post_init__(self) -> None:
        require(self.window_s > 0, f"rollback.window_s must be > 0, got {self.window_s}")
        require(self.min_requests >= 1, f"rollback.min_requests must be >= 1, got {self.min_requests}")
        require(0.0 <= self.max_error_rate_increase <= 1.0,
                f"rollback.max_error_rate_increase must be in 0..1, got {self.max_error_rate_increase}")
        require(self.max_ttft_ratio >= 1.0, f"rollback.max_ttft_ratio must be >= 1, got {self.max_ttft_ratio}")


@dataclass(frozen=True)
class UsageReportConfig:
    """Where to report what each decision used: the kernelgate sidecar's gRPC address
    (``authz.listen``); "" = no reports (the sidecar's reservations then expire as reserved)."""

    address: str = ""
    # per attempt (4 attempts); reports are sent off the response's path, so a slow sidecar costs nothing
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, f"usage_report.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class InferenceConfig:
    """The whole ``inference:`` section of the kernelgate config file.

    ``models`` lists the generative models served side by side; empty means one model, the
    ``model`` section's, as version ``v1``. ``model`` is also the template every served
    version is run with (device, dtype, decoder, ...).
    """

    listen: ListenConfig = field(default_factory=ListenConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    models: tuple[ServedModelConfig, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    usage_report: UsageReportConfig = field(default_factory=UsageReportConfig)
    # Names this replica in responses, spans and load reports; "" means host:port.
    replica_id: str = ""

    def __post_init__(self) -> None:
        names = [m.name for m in self.served_models]
        require(len(set(names)) == len(names), f"models lists a model name twice: {names}")
        require(self.embeddings.name not in names or not self.embeddings.enabled,
                "model.name and embeddings.name must differ")
        require(not self.models or self.model.tp_size == 1, "models (several served models) needs model.tp_size 1")

    @property
    def served_models(self) -> tuple[ServedModelConfig, ...]:
        """``models``, or the one model of the ``model`` section as version ``v1``."""
        if self.models:
            return self.models
        m = self.model
        return (ServedModelConfig(name=m.name, versions=(VersionConfig("v1", m.path, m.random_config, m.seed),),
                                  batching=self.batching, max_model_len=m.max_model_len),)

    def model_config_of(self, model: str, version: VersionConfig) -> ModelConfig:
        """The ``ModelConfig`` a version of ``model`` is loaded with (the ``model`` section as template)."""
        served = next((m for m in self.served_models if m.name == model), None)
        max_len = served.max_model_len if served is not None else self.model.max_model_len
        return replace(self.model, name=model, path=version.path, random_config=version.random_config,
                       seed=version.seed, max_model_len=max_len)
