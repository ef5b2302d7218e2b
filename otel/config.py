"""Typed configuration of tracing (the ``telemetry:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.ports import OTLP_GRPC_ADDRESS
from common.settings import require


@dataclass(frozen=True)
class KernelTraceConfig:
    """CUDA kernel capture: sampled, rate-limited, processed off the request path.

    A request is captured when its trace is head-sampled and either its trace id falls in
    ``ratio`` or the upstream request carries ``force_header: 1`` (the sidecar sets it only
    when the policy decision asked for it); at most ``max_captures_per_minute`` captures
    start per minute, forced ones included. See docs/tracing.md.
    """

    enabled: bool = True
    ratio: float = 0.0
    # Header that forces a kernel trace, honoured only when the policy allowed it for the tenant.
    force_header: str = "x-kernelgate-trace-kernels"
    max_spans_per_trace: int = 512
    max_captures_per_minute: int = 6
    # Kernels of one name beyond this count in one forward are folded into one span with a count.
    fold_after: int = 8
    # Forward passes profiled per captured request: its prefill, then (if > 1) decode steps after it.
    # Each pass costs the engine thread ~21 ms on an H100 with CUPTI attached at the pass, ~34 ms
    # with torch's profiler, ~44 ms on an H200 with CUPTI attached ahead (docs/tracing.md, Cost), so 1.
    steps_per_request: int = 1
    # What the profiler records: "cuda" kernels, "cpu" operators (CPU-only serving, tests), or by device.
    activities: Literal["auto", "cuda", "cpu"] = "auto"
    # What records them: "cupti" (CUPTI's Activity API via cupti-python, CUDA only: ~half the cost),
    # "torch" (torch's profiler), or "auto": cupti for CUDA when cupti-python is installed.
    capture: Literal["auto", "cupti", "torch"] = "auto"
    # Captures waiting for the worker thread; beyond this a capture is dropped, never waited for.
    max_pending: int = 8
    # cupti: attach CUPTI on a thread of its own as soon as a request is selected, so the engine
    # thread only enables, flushes and detaches (the attach, 13-17 ms, is off it); the request's
    # first pass after that is captured (usually an early decode step rather than its prefill).
    # false: attach on the engine thread at the pass (its prefill is captured).
    prepare_ahead: bool = True
    # Adaptive cap: captures are admitted while the engine-thread stall they measure stays under
    # this share of wall-clock time (per cent; 0: no cap but max_captures_per_minute). See budget.py.
    stall_budget_pct: float = 1.0
    # Derived kernel spans (otel/kernels/derive.py): the first captured replay of each decode CUDA
    # graph is recorded; later captured replays of that graph are timed with two CUDA events (no
    # profiler: microseconds on the engine thread) and get the recorded kernels placed inside that
    # time, marked derived. false: every captured pass is recorded.
    derive: bool = True
    # A graph's recorded kernels are derived from for this long (seconds), then recorded again at
    # its next captured replay (0: never again).
    derive_refresh_s: float = 600.0

    def __post_init__(self) -> None:
        require(0.0 <= self.ratio <= 1.0, f"kernels.ratio must be within 0..1, got {self.ratio}")
        require(self.max_spans_per_trace >= 1, "kernels.max_spans_per_trace must be >= 1")
        require(self.max_captures_per_minute >= 0, "kernels.max_captures_per_minute must be >= 0")
        require(self.fold_after >= 1, "kernels.fold_after must be >= 1")
        require(self.steps_per_request >= 1, "kernels.steps_per_request must be >= 1")
        require(self.max_pending >= 1, "kernels.max_pending must be >= 1")
        require(0.0 <= self.stall_budget_pct <= 100.0,
                f"kernels.stall_budget_pct must be within 0..100, got {self.stall_budget_pct}")
        require(self.derive_refresh_s >= 0, f"kernels.derive_refresh_s must be >= 0, got {self.derive_refresh_s}")
        require(not (self.capture == "cupti" and self.activities == "cpu"),
                "kernels.capture: cupti records CUDA kernels only; use torch (or auto) with activities: cpu")


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = False
    # OTLP collector (Jaeger v2 takes OTLP directly): grpc -> host:port, http -> http://host:4318,
    # file -> a path: OTLP/JSON lines if it ends in .json/.jsonl, else length-prefixed protobuf (otel/otlp_file.py)
    otlp_endpoint: str = OTLP_GRPC_ADDRESS
    protocol: Literal["grpc", "http", "file"] = "grpc"
    # Head sampling (parent-based): share of new traces recorded.
    sampling_ratio: float = 1.0
    # Within a recorded trace: prefill engine.step spans, and 1 decode engine.step span in this many.
    decode_step_spans_every: int = 16
    export_timeout_s: float = 5.0
    # How long finished spans wait in the batch before export (seconds).
    export_delay_s: float = 2.0
    max_queue_size: int = 8192
    # Each batch is exported in chunks of at most this weight (a span weighs 1 + its links), with a
    # pause between, so encoding never holds the GIL for long (otel/paced_export.py); 0: whole batches.
    export_chunk_weight: int = 32
    # Spans are encoded and sent by a child process (otel/export_process.py): this process only
    # flattens its SDK spans into tuples (6 us a span against 46 us to encode one), hands the spans it
    # builds after the fact (engine.step, queue, preprocess) and kernel passes over as plain records
    # (no SDK span object: bench/span_export_cost.py), so encoding no longer takes the server's GIL.
    # A dead child loses spans (counted, logged once), never a request. export_chunk_weight does not
    # apply then (the child's GIL is its own). false: encode and send in this process.
    export_process: bool = True
    # GenAI metrics (gen_ai.server.*) exported over the same OTLP endpoint every this many seconds (0: off).
    metrics_interval_s: float = 10.0
    resource_attributes: dict[str, str] = field(default_factory=dict)
    kernels: KernelTraceConfig = field(default_factory=KernelTraceConfig)

    def __post_init__(self) -> None:
        require(0.0 <= self.sampling_ratio <= 1.0,
                f"telemetry.sampling_ratio must be within 0..1, got {self.sampling_ratio}")
        require(self.export_delay_s > 0, "telemetry.export_delay_s must be > 0")
        require(self.export_chunk_weight >= 0, "telemetry.export_chunk_weight must be >= 0 (0: whole batches)")
        require(self.decode_step_spans_every >= 1, "telemetry.decode_step_spans_every must be >= 1")
        require(self.metrics_interval_s >= 0, "telemetry.metrics_interval_s must be >= 0 (0: no metrics)")
