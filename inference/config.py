"""Typed configuration of the inference server.

Filled by the one loader, ``kernelgate.config.load`` (the ``inference:`` section); every
value is checked here, at start-up, so a bad config file fails before a model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.ports import INFERENCE_PORT, LOOPBACK
from common.settings import require

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Decoder = Literal["auto", "fused", "hf"]
Ops = Literal["auto", "torch", "triton", "deepspeed"]


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
    kernels, JIT-built) or ``torch``; ``auto`` is Triton on CUDA, torch on CPU.
    ``tp_size`` > 1 shards the fused decoder over that many processes (one GPU each; the
    server starts the other ranks itself).
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
    cuda_graphs: bool = True
    decoder: Decoder = "auto"
    ops: Ops = "auto"
    max_model_len: int | None = None
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        require(bool(self.name), "model.name must not be empty")
        require(self.cpu_threads >= 0, f"model.cpu_threads must be >= 0 (0: torch's default), got {self.cpu_threads}")
        require(self.tp_size >= 1, f"model.tp_size must be >= 1, got {self.tp_size}")
        require(self.max_model_len is None or self.max_model_len >= 2,
                f"model.max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class BatchingConfig:
    """Bounds of the continuous batch and of the waiting queue in front of it."""

    max_batch_size: int = 16
    max_tokens_in_flight: int = 65536
    max_wait_ms: float = 2.0
    max_queue: int = 256

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
    """The whole ``inference:`` section of the kernelgate config file."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    usage_report: UsageReportConfig = field(default_factory=UsageReportConfig)
    # Names this replica in responses, spans and load reports; "" means host:port.
    replica_id: str = ""

    def __post_init__(self) -> None:
        require(self.model.name != self.embeddings.name or not self.embeddings.enabled,
                "model.name and embeddings.name must differ")
