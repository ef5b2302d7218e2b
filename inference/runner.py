"""Forward steps of a causal LM over the slot KV cache: prefill, decode, CUDA-graph replay.

The runner knows tensors and slots, not requests: the engine tells it which slots to
fill with which prompts, and which tokens/positions to decode next, and gets logits back.
Decode steps have static shapes once the batch is padded to a bucket and the attended
key length is rounded up, so on CUDA each (batch bucket, key-length bucket) is captured
once as a CUDA graph and replayed, which removes the per-kernel launch cost that
dominates small-batch decoding.

For kernel tracing the runner also *reports* (it never takes an object to fill in):
:meth:`ModelRunner.decode_key` names the fixed work a decode step will run (the CUDA graph it
replays; on CPU, the eager decode of that shape), and :meth:`ModelRunner.decode_timed` runs the
step and returns a :class:`DecodeTiming` of that work: two CUDA events around the graph replay
on its stream (no sync, no profiler), or the host clock around an eager CPU decode. The kernel
tracer (otel/kernels/) places kernel spans recorded once per key inside that interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from inference.attention import AttentionBatch, SlotAttention
from inference.kv_cache import KVGeometry, SlotKVCache

log = logging.getLogger("kernelgate.inference.runner")

MIN_KV_BUCKET = 64


def kv_bucket(length: int, max_len: int) -> int:
    """Key length a step attends over: next power of two (at least 64), capped at the cache."""
    bucket = MIN_KV_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, then every multiple of 8, and the max."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecoderModel(Protocol):
    """What the runner needs of a model: hidden states of token ids at positions, then logits.

    Attention inside goes through the :class:`SlotAttention` the runner was given (the runner
    sets its batch before each call). :class:`inference.llama.FusedLlama` is one; any Hugging
    Face causal LM is adapted by :func:`as_decoder`.
    """

    config: Any

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class _HFDecoder:
    """A Hugging Face causal LM (plain or DeepSpeed-injected) seen as a :class:`DecoderModel`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.config = module.config
        self._backbone = module.base_model
        self._lm_head = module.get_output_embeddings()

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self._backbone(input_ids=tokens, position_ids=positions, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)


def as_decoder(module: Any) -> DecoderModel:
    return module if hasattr(module, "hidden_states") and hasattr(module, "logits") else _HFDecoder(module)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive bias SDPA adds (0 where allowed), built once per step.

    SDPA would otherwise convert a boolean mask in every layer.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass(frozen=True)
class DecodeTiming:
    """A decode step's fixed work (a graph replay, or an eager CPU decode) as the runner timed it.

    ``wall_start_ns`` is the wall clock read right after the start mark was placed (on CUDA the mark
    runs on the device when the stream reaches it: at or after that instant), ``uncertainty_ns`` how
    long placing it took. ``elapsed_ns`` blocks until the end mark has run (call it off the engine
    thread): CUDA events' elapsed time (~0.5 us resolution), or the host clock on CPU.
    """

    key: tuple[int, ...]
    wall_start_ns: int
    uncertainty_ns: int
    stream: int
    start: Any  # torch.cuda.Event, or perf_counter_ns on CPU
    end: Any

    def elapsed_ns(self) -> int:
        if isinstance(self.start, int):
            return self.end - self.start
        self.end.synchronize()
        return int(self.start.elapsed_time(self.end) * 1_000_000)


@dataclass
class _DecodeGraph:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor


class ModelRunner:
    """Runs one model's forward passes; the only place that touches the KV cache."""

    def __init__(self, module: torch.nn.Module, attention: SlotAttention, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, use_cuda_graphs: bool) -> None:
        self._model = as_decoder(module)
        self._attention = attention
        self.device = device
        self.dtype = dtype
        self.max_len = max_len
        self.num_slots = num_slots
        geometry = getattr(module, "kv_geometry", None) or KVGeometry.of(module.config)
        self.kv = SlotKVCache(geometry, num_slots, max_len, dtype, device)
        attention.cache = self.kv
        self._columns = torch.arange(max_len, device=device)
        self._row_index = torch.arange(num_slots, device=device).view(-1, 1)
        self._use_graphs = use_cuda_graphs and device.type == "cuda"
        self.use_cuda_graphs = self._use_graphs  # tensor-parallel followers build their runner the same
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._buckets = batch_buckets(num_slots)
        self._bucket_of = [next(b for b in self._buckets if b >= rows) for rows in range(num_slots + 1)]
        # The graphs' inputs: tokens and positions, one device buffer filled by one copy per step
        # from a pinned host buffer written in place through a numpy view (no tensor per step).
        # Two host buffers, used in turn: a step may be launched while the previous one's copy
        # has not run yet (pipelined decode launches before the previous step is read).
        self._static_io = torch.zeros(2, num_slots, 1, dtype=torch.long, device=device)
        self._static_tokens, self._static_positions = self._static_io[0], self._static_io[1]
        self._staging = [torch.zeros(2, num_slots, 1, dtype=torch.long, pin_memory=device.type == "cuda")
                         for _ in range(2)]
        self._staging_np = [buffer.numpy()[:, :, 0] for buffer in self._staging]
        self._staged: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each buffer
        self._stage_turn = 0
        # Distinguishes this runner's graphs from another's (a hot-swapped version) in decode keys.
        self._generation = time.monotonic_ns()

    @property
    def uses_cuda_graphs(self) -> bool:
        return bool(self._graphs)

    # -- steps ------------------------------------------------------------------------------

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        """Fill slots ``first_slot..`` with ``prompts``; return next-token logits ``[n, vocab]``."""
        return self.prefill_full(first_slot, prompts, [])[0]

    def prefill_full(self, first_slot: int, prompts: list[list[int]],
                     full_rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As :meth:`prefill`, plus the logits at every prompt position ``[len, vocab]`` of the
        rows in ``full_rows`` (for the log-probabilities of the prompt's own tokens)."""
        hidden = self._prefill_hidden(first_slot, prompts)
        rows = len(prompts)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        full = [self._model.logits(hidden[row, :len(prompts[row])]) for row in full_rows]
        return self._model.logits(hidden[torch.arange(rows, device=self.device), last]), full

    def _prefill_hidden(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        rows = len(prompts)
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(rows, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        tokens = tokens.to(self.device, non_blocking=True)
        positions = self._columns[:width].expand(rows, width)
        causal = self._columns[:width].view(1, width) <= self._columns[:width].view(width, 1)
        batch = AttentionBatch(first_slot=first_slot, num_rows=rows, kv_len=width,
                               row_index=self._row_index[:rows], write_positions=positions,
                               mask=additive_mask(causal, self.dtype).expand(rows, 1, width, width), causal=True)
        return self._hidden(tokens, positions, batch)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of the first ``len(tokens)`` slots; return logits ``[n, vocab]``.

        ``positions[i]`` is the cache column (= sequence position) of ``tokens[i]``.
        """
        return self._decode(tokens, positions, timed=False)[0]

    def decode_from(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """As :meth:`decode`, with the tokens already on the device (``[rows]`` int64: the previous
        step's choices, not read back yet), so this step is queued before the host knows them.

        On CUDA graphs: the positions go up with the usual pinned copy, then one device-to-device
        copy puts the tokens into the graph's static input; nothing waits for the device.
        """
        return self._decode(tokens, positions, timed=False)[0]

    def decode_key(self, rows: int, max_position: int) -> tuple[int, ...] | None:
        """What a decode step of ``rows`` sequences up to ``max_position`` runs, when that is a fixed
        sequence of work: ``(generation, batch bucket, key length)`` of the CUDA graph it replays, or
        on CPU ``(0, rows, key length)`` (eager, same shapes: the same operators). None: eager on a GPU."""
        kv_len = kv_bucket(max_position + 1, self.max_len)
        if self._graphs:
            size = self._bucket_of[rows]
            if (size, kv_len) in self._graphs:
                return (self._generation, size, kv_len)
        return (0, rows, kv_len) if self.device.type == "cpu" else None

    def decode_timed(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, DecodeTiming | None]:
        """As :meth:`decode`, plus the timing of its fixed work (None when :meth:`decode_key` is None)."""
        return self._decode(tokens, positions, timed=True)

    def _decode(self, tokens: list[int] | torch.Tensor, positions: list[int],
                timed: bool) -> tuple[torch.Tensor, DecodeTiming | None]:
        rows = len(positions)
        on_device = isinstance(tokens, torch.Tensor)
        kv_len = kv_bucket(max(positions) + 1, self.max_len)
        if self._graphs:
            size = self._bucket_of[rows]
            graph = self._graphs.get((size, kv_len))
            if graph is not None:
                self._stage(None if on_device else tokens, positions, size)
                if on_device:
                    self._static_tokens[:rows].view(-1).copy_(tokens)
                if not timed:
                    graph.graph.replay()
                    return graph.logits[:rows], None
                stream = torch.cuda.current_stream(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before = time.time_ns()
                start.record(stream)
                wall = time.time_ns()
                graph.graph.replay()
                end.record(stream)
                return graph.logits[:rows], DecodeTiming((self._generation, size, kv_len), wall,
                                                         (wall - before) // 2, stream.stream_id, start, end)
        token_tensor = (tokens if on_device else torch.tensor(tokens, dtype=torch.long)).view(rows, 1).to(self.device)
        position_tensor = torch.tensor(positions, dtype=torch.long).view(rows, 1).to(self.device)
        if not timed or self.device.type != "cpu":
            return self._decode_logits(token_tensor, position_tensor, kv_len), None
        wall, began = time.time_ns(), time.perf_counter_ns()
        logits = self._decode_logits(token_tensor, position_tensor, kv_len)
        return logits, DecodeTiming((0, rows, kv_len), wall, 0, 0, began, time.perf_counter_ns())

    def wait_queued(self) -> None:
        """Wait for the steps already queued (the engine calls it before reading the tokens of a
        pipelined step that nothing follows). Nothing to do in one process: reading the tokens
        waits for them; tensor parallel puts its watchdog's deadline on this wait."""

    def move(self, src: int, dst: int, length: int) -> None:
        self.kv.move(src, dst, length)

    # -- CUDA graphs ------------------------------------------------------------------------

    def capture_decode_graphs(self, between: Callable[[], None] | None = None) -> int:
        """Capture every (batch bucket, key-length bucket) decode step; return how many. ``between`` is
        called after each capture (a version loading beside serving ones yields to them there)."""
        if not self._use_graphs:
            return 0
        started = time.monotonic()
        self._generation = time.monotonic_ns()  # new graphs: new decode keys (kernel tracing re-records them)
        kv_lens = sorted({kv_bucket(n, self.max_len) for n in _powers_of_two(MIN_KV_BUCKET, self.max_len)})
        pool = torch.cuda.graph_pool_handle()
        self._static_tokens.zero_()
        self._static_positions.zero_()
        try:
            for size in reversed(self._buckets):
                for kv_len in reversed(kv_lens):
                    self._graphs[(size, kv_len)] = self._capture(size, kv_len, pool)
                    if between is not None:
                        between()
        except Exception:  # noqa: BLE001 - a model whose kernels cannot be captured still serves
            log.exception("CUDA graph capture failed; decoding without CUDA graphs")
            self._graphs.clear()
            torch.cuda.current_stream().synchronize()
            return 0
        torch.cuda.current_stream().synchronize()  # this thread's work only, not another engine's
        log.info("captured %d decode CUDA graphs (batch %s x key length %s) in %.1fs", len(self._graphs),
                 self._buckets, kv_lens, time.monotonic() - started)
        return len(self._graphs)

    def release_graphs(self) -> None:
        """Drop the captured decode graphs (decoding goes on eagerly). Before a tensor-parallel group
        is torn down: NCCL communicators whose collectives live in captured graphs do not go away
        while the graphs do (both ranks then block in the teardown)."""
        if self._graphs:
            torch.cuda.current_stream().synchronize()
            for captured in self._graphs.values():
                captured.graph.reset()
            self._graphs.clear()

    def _capture(self, size: int, kv_len: int, pool: object) -> _DecodeGraph:
        tokens, positions = self._static_tokens[:size], self._static_positions[:size]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode_logits(tokens, positions, kv_len)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # A version loading beside a serving one (#15 hot swap) captures on its engine thread while
        # the other engine's thread decodes. thread_local: "global" (torch's default) would make the
        # serving thread's allocations and syncs fail, or void this capture. capture_begin/end, not
        # the ``torch.cuda.graph`` context: that one synchronizes the whole device and empties the
        # caching allocator (cudaFree, an implicit device sync) before every capture, which stalled
        # the serving version's steps 2 x 25 times during a swap.
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                logits = self._decode_logits(tokens, positions, kv_len)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return _DecodeGraph(graph=graph, logits=logits)

    def _stage(self, tokens: list[int] | None, positions: list[int], size: int) -> None:
        """Copy this step's tokens/positions into the graph's static inputs (pinned, asynchronous).

        ``tokens`` None: the caller copies them on the device afterwards. A pinned buffer is
        rewritten only once its previous copy (two steps ago) has run: a caller that does not
        read the logits back (no sync) would otherwise change that step's inputs under it.
        """
        turn = self._stage_turn
        self._stage_turn ^= 1
        staged = self._staged[turn]
        if staged is not None:
            staged.synchronize()
        rows = len(positions)
        host = self._staging_np[turn]
        if tokens is not None:
            host[0, :rows] = tokens
        host[1, :rows] = positions
        host[:, rows:size] = 0
        self._static_io.copy_(self._staging[turn], non_blocking=True)
        if staged is None:
            staged = self._staged[turn] = torch.cuda.Event()
        staged.record()

    # -- forward ----------------------------------------------------------------------------

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        rows = tokens.shape[0]
        allowed = self._columns[:kv_len].view(1, 1, 1, kv_len) <= positions.view(rows, 1, 1, 1)
        batch = AttentionBatch(first_slot=0, num_rows=rows, kv_len=kv_len, row_index=self._row_index[:rows],
                               write_positions=positions, mask=additive_mask(allowed, self.dtype))
        hidden = self._hidden(tokens, positions, batch)
        return self._model.logits(hidden[:, -1])

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        self._attention.batch = batch
        try:
            return self._model.hidden_states(tokens, positions)
        finally:
            self._attention.batch = None


def _powers_of_two(start: int, stop: int) -> list[int]:
    values = []
    value = start
    while value < stop * 2:
        values.append(value)
        value *= 2
    return values
