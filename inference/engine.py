"""The generation engine: one thread that loads the model, then runs continuous batching.

Knows nothing of HTTP. The serving layer calls :meth:`Engine.submit` on the event loop and
reads :class:`RequestStream` outputs; the engine thread admits waiting requests between
decode steps (prefilling them into free slots), decodes every running sequence one token
per step, applies stop conditions, and hands each step's outputs back to the event loop in
one ``call_soon_threadsafe``. Torch releases the GIL inside kernels, so the event loop keeps
serving while a step runs.

Decode is pipelined (``batching.pipeline_decode``): while the batch stays the same, step N+1 is
launched with step N's tokens still on the device (``runner.decode_from``), then step N's tokens
are read and applied, so this thread's per-step work overlaps the device's next step. A row whose
sequence ended with step N has its step N+1 result dropped; admissions, aborts, retirements,
grammar-guided rows and a forward observer that watches (kernel tracing of a selected request
running) make the next step wait for the host (one at a time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from common.gc_freeze import freeze_startup_objects
from inference.config import BatchingConfig, ModelConfig
from inference.detokenize import IncrementalDetokenizer, StopStringFilter
from inference.generation import (EngineDeadError, EngineNotReadyError, EngineStats, GenerationOutput, GenerationRequest,
                                  LogprobRows, ModelInfo, RequestStream, Spent)
from inference.metrics import InferenceMetrics
from inference.model_loader import LoadedModel, load_model
from inference.runner import ModelRunner
from inference.sampling import PendingPicks, Pick, RequestSampler, SlotSampling, prompt_logprobs
from inference.scheduler import Scheduler, Sequence
from inference.pacing import LoadPacer
from inference.structured import Grammars, GrammarTables, tokenizer_key
from inference.tracing import ForwardObserver, StepInfo, StepPhase, Tracing
from otel import names

log = logging.getLogger("kernelgate.inference.engine")

MAX_PREFILL_TOKENS = 8192
# A step (its launch-to-results time plus the host gap before it, while sequences were running)
# this long is kept in the engine's recent slow steps (``slow_steps``; the admin status shows
# them): where a hot swap, a collection or a GIL convoy stalled serving, with wall-clock times.
SLOW_STEP_NS = 20_000_000
SLOW_STEPS_KEPT = 64
# Every engine's steps run on a CUDA stream of this priority (lower is higher; torch maps it to the
# highest the device has); a version loading beside serving ones starts up on a default-priority one.
SERVING_STREAM_PRIORITY = -1
# Set to 0: every engine runs on its thread's default stream, as before (a diagnostic switch for A/B runs).
STREAMS_ENV = "KERNELGATE_ENGINE_STREAMS"


@dataclass
class _Held:
    """A decode step's outputs and span, handed on after the next step's launch."""

    deliveries: list[tuple[RequestStream, GenerationOutput]]
    untexted: list[tuple[int, _DecodeState]]  # rows whose text is still to be detokenized
    step: StepInfo | None  # None: already recorded
    end_ns: int
    contexts: list[Any]

    def texted(self) -> list[tuple[RequestStream, GenerationOutput]]:
        """The deliveries, every text filled in (each sequence's detokenizer sees its tokens in order)."""
        for row, state in self.untexted:
            sink, output = self.deliveries[row]
            text = state.stop_filter.push(state.detokenizer.add(output.token_ids[0]))
            self.deliveries[row] = (sink, replace(output, text=text))
        self.untexted = []
        return self.deliveries


@dataclass
class _Launched:
    """A step queued on the device whose tokens are not read yet (its picks are pending)."""

    phase: StepPhase
    seqs: list[Sequence]  # row i = seqs[i], as launched (a row whose sequence left since is dropped)
    step: StepInfo
    picks: PendingPicks
    positions: list[int]  # decode: each row's input position (a chained step's are these + 1)
    leaders: list[Sequence]
    prompt_logits: dict[int, torch.Tensor]


@dataclass
class _DecodeState:
    """Per-request decoding state, created when the request gets a slot."""

    sampler: RequestSampler
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    stop_token_ids: frozenset[int]


class Engine:
    """Owns the model and the thread that runs it."""

    def __init__(self, model_config: ModelConfig, batching: BatchingConfig, metrics: InferenceMetrics,
                 tracing: Tracing, forward_observer: ForwardObserver | None = None,
                 load: Callable[[ModelConfig, int], LoadedModel] = load_model,
                 wrap_runner: Callable[[ModelRunner], Any] | None = None, beside_serving: bool = False,
                 pacer: LoadPacer | None = None, grammar_tables: GrammarTables | None = None) -> None:
        """``beside_serving``: the engine starts while others in this process serve (a version loaded
        by the admin API): its start-up collects only the young generations before freezing its
        objects (``common.gc_freeze``), so no full collection holds the GIL from the serving threads.
        ``pacer`` (with ``beside_serving``): its start-up chunks and, until the pacer is stopped, its
        steps yield to the serving engines (``inference.pacing``). ``grammar_tables``: the server's
        grammar tables, shared by the versions of one tokenizer (None: this engine builds its own)."""
        self._model_config = model_config
        self._beside_serving = beside_serving or pacer is not None
        self._pacer = pacer
        self._grammar_tables = grammar_tables
        self._batching = batching
        self.metrics = metrics
        self._tracing = tracing
        self._observer = forward_observer
        self._load = load
        self._wrap_runner = wrap_runner  # e.g. tensor parallel: mirror every step to the other ranks
        self._scheduler = Scheduler(batching, MAX_PREFILL_TOKENS)
        self._cond = threading.Condition()
        self._aborts: set[str] = set()
        self._by_id: dict[str, list[Sequence]] = {}
        self._ready = threading.Event()
        self._stopping = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._model: LoadedModel | None = None
        self._runner: ModelRunner | None = None
        self._sampling: SlotSampling | None = None
        self._guides: Grammars | None = None
        self._steps = 0
        self._launches = 0
        # Pipelined decode (batching.pipeline_decode): decode step N+1 is launched with step N's
        # tokens still on the device, before the host reads them. A forward observer (kernel
        # tracing) brackets one step at a time while it watches (a selected request is running):
        # then steps run one at a time; while it is idle they pipeline.
        self._pipelined = batching.pipeline_decode
        self._last_step_end_ns: int | None = None  # None: idle since (no running sequence)
        # (wall start s, step ms, gap ms before it, phase, batch) of recent slow steps; appended on the
        # engine thread, copied on the event loop (both whole operations under the GIL)
        self._slow_steps: deque[tuple[float, float, float, str, int]] = deque(maxlen=SLOW_STEPS_KEPT)
        # A decode step's outputs (and its span) are handed on once the next step is launched:
        # the GPU works meanwhile, instead of idling through them at batch 1. A step that
        # finishes a sequence or prefills delivers at once.
        self._held: _Held | None = None
        self.info: ModelInfo | None = None
        metrics.watch_gpu_memory(self._gpu_memory_bytes)

    # -- lifecycle (any thread) -------------------------------------------------------------

    def start(self) -> None:
        """Load and warm up on the engine thread; ``ready`` turns true when done."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="kernelgate-engine", daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._failure is None and not self._stopping

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def fail(self, exc: BaseException) -> None:
        """Take the engine out of service from outside (a tensor-parallel rank died): not ready, and
        every queued or running request gets ``EngineDeadError``, even if the engine thread is stuck
        in a collective that will never complete."""
        if self._failure is None:
            self._failure = exc
        self.metrics.ready.set(0)
        self._fail_all(exc)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish what is running or queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._tracing.flush(timeout)  # the engine's spans are built on the span thread: let them out

    def slow_steps(self) -> list[tuple[float, float, float, str, int]]:
        """Recent steps that took ``SLOW_STEP_NS`` or more with the host gap before them, oldest
        first: (wall-clock start in s, step ms, gap ms, phase, batch size)."""
        return list(self._slow_steps)

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(waiting=len(self._scheduler.waiting), running=len(self._scheduler.running),
                               steps=self._steps)

    # -- requests (event loop thread) -------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises QueueFullError, EngineNotReadyError or EngineDeadError."""
        if self._failure is not None:
            raise EngineDeadError(f"engine failed: {self._failure}")
        n = request.params.n
        stream = RequestStream(request.request_id, asyncio.get_running_loop(), self.abort, sequences=n)
        enqueued, enqueued_wall = time.monotonic_ns(), time.time_ns()
        leader = Sequence(request=request, sink=stream, enqueued_ns=enqueued, enqueued_wall_ns=enqueued_wall,
                          token_ids=list(request.prompt_token_ids))
        seqs = [leader] + [Sequence(request=request, sink=stream, enqueued_ns=enqueued, enqueued_wall_ns=enqueued_wall,
                                    token_ids=list(request.prompt_token_ids), index=i, leader=leader)
                           for i in range(1, n)]
        with self._cond:
            if not self._ready.is_set() or self._stopping:
                raise EngineNotReadyError("model is not ready" if not self._stopping else "server is shutting down")
            self._scheduler.add(seqs)
            self._by_id[request.request_id] = seqs
            self.metrics.queue_depth.set(len(self._scheduler.waiting))
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone); its slot is freed at the next step boundary."""
        with self._cond:
            if request_id in self._by_id:
                self._aborts.add(request_id)
                self._cond.notify()

    # -- engine thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with torch.inference_mode():
                chunk = time.monotonic()
                self._model = self._load(self._model_config, self._batching.max_batch_size)
                loading, serving = self._streams(self._model)
                if loading is not None:
                    loading.wait_stream(torch.cuda.current_stream(self._model.device))
                with torch.cuda.stream(loading):  # None (off CUDA, or no loading stream): this thread's stream
                    self._start_up(chunk)
                if serving is not None:
                    serving.wait_stream(loading if loading is not None
                                        else torch.cuda.current_stream(self._model.device))
                with torch.cuda.stream(serving):
                    self._serve()
                    if serving is not None:
                        serving.synchronize()  # its tensors may be freed (reused) once the thread is gone
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting client and to /readyz
            log.exception("inference engine failed")
            self._failure = exc
            self.metrics.ready.set(0)
            self._fail_all(exc)

    def _streams(self, model: LoadedModel) -> tuple[Any, Any]:
        """The CUDA streams of the warm-up and of serving: (loading, serving), each None for this
        thread's current stream (off CUDA, tensor parallel, DeepSpeed's kernels, or streams unavailable).

        Every engine serves on a high-priority stream, and a version paced beside serving ones warms
        up (warm-up steps, graph capture) on a default-priority one: the GPU's block scheduler then
        runs a serving version's steps ahead of a loading version's kernels. Streams come from torch's
        pool; the loading stream's work is done (synchronized) before serving starts, and the serving
        stream's before the engine thread ends, so no tensor is freed with work of the other pending."""
        if (self._wrap_runner is not None or model.device.type != "cuda" or not _on_torch_streams(model.backend)
                or os.environ.get(STREAMS_ENV, "1") == "0"):
            return None, None
        try:
            loading = torch.cuda.Stream(model.device) if self._pacer is not None else None
            return loading, torch.cuda.Stream(model.device, priority=SERVING_STREAM_PRIORITY)
        except Exception:  # noqa: BLE001 - serving on the thread's current stream still works
            log.warning("CUDA stream priorities unavailable; %s uses the default stream", self._model_config.name,
                        exc_info=True)
            return None, None

    def _start_up(self, chunk: float) -> None:
        """Build the loaded model's runner, warm up (graph capture included)."""
        assert self._model is not None
        self._runner = ModelRunner(self._model.module, self._model.attention,
                                   num_slots=self._batching.max_batch_size,
                                   max_len=self._model.max_model_len, dtype=self._model.dtype,
                                   device=self._model.device, use_cuda_graphs=self._model_config.cuda_graphs)
        if self._wrap_runner is not None:
            self._runner = self._wrap_runner(self._runner)
        self._pace(chunk, "load", sync=True)
        self._warm_up()

    def _serve(self) -> None:
        """Freeze the start-up objects, build the sampler and grammar tables, then serve until stopped."""
        assert self._model is not None and self._runner is not None
        marks = [time.monotonic()]
        freeze_startup_objects(full=not self._beside_serving)
        marks.append(time.monotonic())
        self._pace(marks[-2], "gc freeze")
        marks.append(time.monotonic())
        self._sampling = SlotSampling(self._batching.max_batch_size, self._model.vocab_size,
                                      self._model.device, logits_dtype=self._model.dtype)
        marks.append(time.monotonic())
        self._pace(marks[-2], "sampler")
        marks.append(time.monotonic())
        self._guides, shared = self._grammars()
        marks.append(time.monotonic())
        self._pace(marks[-2], "grammars")
        log.info("start-up of %s: gc freeze %.0f ms (%s collection), sampler %.0f ms, grammars %.0f ms (%s)%s",
                 self._model_config.name, 1e3 * (marks[1] - marks[0]),
                 "young" if self._beside_serving else "full", 1e3 * (marks[3] - marks[2]),
                 1e3 * (marks[5] - marks[4]), "shared" if shared else "built",
                 "" if self._pacer is None else
                 f"; paced: {self._pacer.pauses} pauses, {1e3 * self._pacer.paused_s:.0f} ms")
        self.info = ModelInfo(name=self._model_config.name, max_model_len=self._model.max_model_len,
                              vocab_size=self._model.vocab_size, eos_token_ids=self._model.eos_token_ids,
                              tokenizer=self._model.tokenizer, backend=self._model.backend,
                              device=str(self._model.device), max_sequences=self._batching.max_batch_size,
                              grammars=self._guides)
        self._ready.set()
        self.metrics.ready.set(1)
        log.info("model %s ready (%s backend, %s, KV cache %.1f MiB, CUDA graphs %s)", self.info.name,
                 self.info.backend, self.info.device, self._runner.kv.nbytes / 2**20,
                 "on" if self._runner.uses_cuda_graphs else "off")
        self._loop()
        if hasattr(self._runner, "close"):
            self._runner.close()

    def _warm_up(self) -> None:
        """One full-batch prefill and decode (allocates every workspace), then graph capture; paced
        (a pause after each, and after each captured graph) when loading beside serving engines."""
        runner = self._runner
        assert runner is not None
        started = chunk = time.monotonic()
        rows = runner.num_slots
        runner.prefill(0, [[1, 2, 3, 4]] * rows)
        self._pace(chunk, "warm-up prefill", sync=True)
        chunk = time.monotonic()
        runner.decode([5] * rows, [4] * rows)
        self._pace(chunk, "warm-up decode", sync=True)
        if runner.device.type == "cuda" and self._pacer is None:
            torch.cuda.synchronize()
        elif runner.device.type == "cuda":
            # this thread's stream only: a device-wide sync would also wait for the serving versions' steps
            torch.cuda.current_stream(runner.device).synchronize()
        if self._pacer is None:
            runner.capture_decode_graphs()
        else:
            marks = [time.monotonic()]

            def between() -> None:
                self._pace(marks[0], "capture", sync=True)
                marks[0] = time.monotonic()

            runner.capture_decode_graphs(between=between)
        log.info("warm-up done in %.1fs", time.monotonic() - started)

    def _pace(self, chunk_started: float, what: str, sync: bool = False) -> None:
        """A chunk of start-up or validation work that began at ``chunk_started`` is done: yield to the
        serving engines (``inference.pacing``) while this engine is paced. ``sync``: wait for the
        chunk's kernels first (this thread's stream only), so they do not run into the pause."""
        pacer = self._pacer
        if pacer is None or not pacer.active:
            return
        model = self._model
        if sync and model is not None and model.device.type == "cuda":
            torch.cuda.current_stream(model.device).synchronize()
        pacer.pause(time.monotonic() - chunk_started, what)

    @property
    def paused_s(self) -> float:
        """Seconds this engine's work has waited for serving engines (``inference.pacing``), all told."""
        return self._pacer.paused_s if self._pacer is not None else 0.0

    def _grammars(self) -> tuple[Grammars | None, bool]:
        """This model's grammar tables, and whether they came shared from ``grammar_tables``."""
        model = self._model
        assert model is not None
        if self._grammar_tables is None:
            return _grammars(model), False
        key = tokenizer_key(self._model_config.path, model.vocab_size, model.eos_token_ids)
        return self._grammar_tables.get(key, lambda: _grammars(model))

    def _loop(self) -> None:
        launched: _Launched | None = None  # a decode step whose tokens are not read yet
        while True:
            if launched is not None:
                following = None
                if self._pipelined:
                    with self._cond:
                        chain = self._can_chain(launched)
                    if chain:  # queued behind ``launched`` on the device, fed its tokens there
                        following = self._launch("decode", launched.seqs, after=launched)
                if following is None:
                    assert self._runner is not None
                    self._runner.wait_queued()
                self._finish(launched)
                if following is None:
                    self._pace_step(launched.step)
                launched = following
                continue
            with self._cond:
                self._apply_aborts()
                now = time.monotonic_ns()
                admitted = self._scheduler.admit(now, draining=self._stopping)
                running = list(self._scheduler.running)
                self.metrics.queue_depth.set(len(self._scheduler.waiting))
                self.metrics.running.set(len(running))
                if not running:
                    self._last_step_end_ns = None
                    self._release_held()
                    if self._stopping and not self._scheduler.waiting:
                        return
                    self._cond.wait(self._scheduler.wait_timeout_s(now))
                    continue
            if admitted:
                prefill = self._launch("prefill", admitted)
                self._finish(prefill)
                self._pace_step(prefill.step)
            else:
                launched = self._launch("decode", running)

    def _can_chain(self, launched: _Launched) -> bool:
        """Whether the next decode step may be launched before ``launched``'s tokens are read (caller
        holds the lock): same batch in the same slots, nothing to admit or abort first, no grammar
        (it masks each step on the host), no forward observer watching steps, and a token left to
        generate for some row. A row whose sequence ends with ``launched``'s token (stop token,
        stop string) has the early step's result dropped."""
        seqs = launched.seqs
        runner, sampling = self._runner, self._sampling
        assert runner is not None and sampling is not None
        return (launched.phase == "decode" and not self._aborts and seqs == self._scheduler.running
                and not sampling.host_bound
                and any(s.generated + 1 < s.request.params.max_tokens for s in seqs)
                and max(launched.positions) + 1 < runner.max_len
                and (self._pacer is None or not self._pacer.active)
                and not self._scheduler.can_admit(time.monotonic_ns(), draining=self._stopping)
                and (self._observer is None or self._observer.idle()))

    def _launch(self, phase: StepPhase, seqs: list[Sequence], after: _Launched | None = None) -> _Launched:
        """Queue a step and its token choice on the device (``after``: a decode step fed the tokens
        of ``after``, still unread, on the device); the previous step's held outputs go out meanwhile."""
        runner = self._runner
        assert runner is not None and self._sampling is not None
        prompt_logits: dict[int, torch.Tensor] = {}
        if phase == "prefill":
            for seq in seqs:
                self._begin(seq)
            # Leaders come first and hold consecutive slots; forks (n > 1) copy their leader's prefill.
            leaders = [s for s in seqs if s.leader is None]
            tokens = [s.prompt_len if s.leader is None else 0 for s in seqs]
        else:
            leaders = seqs
            tokens = [1] * len(seqs)
        if phase == "decode":
            decode_positions = ([p + 1 for p in after.positions] if after is not None
                                else [len(s.token_ids) - 1 for s in seqs])
        graph_key = None
        if phase == "decode" and self._observer is not None and hasattr(runner, "decode_key"):
            graph_key = runner.decode_key(len(seqs), max(decode_positions))
        step = StepInfo(index=self._launches, phase=phase, batch_size=len(seqs), num_tokens=sum(tokens),
                        request_ids=tuple(s.request_id for s in seqs), start_time_ns=time.time_ns(),
                        trace_contexts=tuple(s.request.trace_context for s in seqs),
                        tokens_per_sequence=tuple(tokens), graph_key=graph_key)
        self._launches += 1
        timed = self._notify_observer("start", step, None) and graph_key is not None
        positions: list[int] = []
        if phase == "prefill":
            prompts = [s.token_ids for s in leaders]
            echo_rows = [i for i, s in enumerate(leaders) if s.request.params.prompt_logprobs is not None]
            if echo_rows:
                logits, full = runner.prefill_full(leaders[0].slot, prompts, echo_rows)
                prompt_logits = dict(zip(echo_rows, full))
            else:
                logits = runner.prefill(leaders[0].slot, prompts)
            row_of = {id(s): i for i, s in enumerate(leaders)}
            forks = [s for s in seqs if s.leader is not None]
            for fork in forks:
                runner.move(fork.leader.slot, fork.slot, fork.prompt_len)
            if forks:
                logits = logits[torch.tensor([row_of[id(s.leader or s)] for s in seqs], device=logits.device)]
        elif after is not None:  # pipelined: the tokens are ``after``'s, still on the device
            positions = decode_positions
            logits = runner.decode_from(after.picks.tokens, positions)
            self.metrics.pipelined_steps.inc()
        else:
            positions = decode_positions
            decode_tokens = [s.token_ids[-1] for s in seqs]
            if timed:  # the observer asked: the runner reports how long the graph replay ran
                logits, replay = runner.decode_timed(decode_tokens, positions)
                step = replace(step, replay=replay)
            else:
                logits = runner.decode(decode_tokens, positions)
        picks = self._sampling.launch(logits, seqs[0].slot, [s.state.sampler for s in seqs])
        self._release_held()  # the step is queued: the previous one's outputs go out meanwhile
        return _Launched(phase, seqs, step, picks, positions, leaders, prompt_logits)

    def _finish(self, launched: _Launched) -> None:
        """Read a launched step's tokens and apply them: append, stop checks, retire, deliver (or hold)."""
        self._release_held()  # a step finished without a launch since (not chained): its outputs go first
        phase, seqs, step, leaders = launched.phase, launched.seqs, launched.step, launched.leaders
        picks = launched.picks.result()
        echoes = {id(leaders[row]): prompt_logprobs(full_logits, leaders[row].token_ids,
                                                    leaders[row].request.params.prompt_logprobs or 0)
                  for row, full_logits in launched.prompt_logits.items()}
        end_ns, now = time.time_ns(), time.monotonic_ns()
        self._steps += 1
        self._note_step(step, end_ns)
        deliveries: list[tuple[RequestStream, GenerationOutput]] = []
        done: list[Sequence] = []
        untexted: list[tuple[int, _DecodeState]] = []  # rows whose text is detokenized after the next launch
        for seq, pick in zip(seqs, picks):
            if seq.slot < 0:  # it ended with the step before (this step was launched before that was known)
                continue
            output, later = self._append(seq, pick, now, echoes.get(id(seq.leader or seq)), phase == "decode")
            if later:
                untexted.append((len(deliveries), seq.state))
            deliveries.append((seq.sink, output))
            if output.finished:
                done.append(seq)
        with self._cond:
            for seq in done:
                self._retire(seq)
            self.metrics.running.set(len(self._scheduler.running))
        self.metrics.batch_size.labels(phase).observe(len(seqs))
        self.metrics.generated_tokens.inc(len(deliveries))
        if phase == "prefill":
            self.metrics.prompt_tokens.inc(step.num_tokens)
        contexts = [s.request.trace_context for s in seqs]
        held = _Held(deliveries, untexted, step, end_ns, contexts)
        if done or phase == "prefill":
            self._deliver(held.texted())
        elif self._observer is None:  # the step's span can wait for the next launch too
            self._held = held
            return
        else:  # a forward observer (kernel tracing) gets each step's finish before the next start
            held.step = None
            self._held = held
        self._record_step(step, end_ns, contexts)

    def _pace_step(self, step: StepInfo) -> None:
        """While paced (a version validating beside serving ones: its probe and shadow steps), yield to
        the serving engines after each step; the pause is not counted as a host gap in ``slow_steps``."""
        pacer = self._pacer
        if pacer is None or not pacer.active:
            return
        took = pacer.pause((time.time_ns() - step.start_time_ns) / 1e9, step.phase)
        if self._last_step_end_ns is not None:
            self._last_step_end_ns += int(took * 1e9)

    def _note_step(self, step: StepInfo, end_ns: int) -> None:
        """Keep the step in ``slow_steps`` when it, with the host gap since the previous one, was slow."""
        last, self._last_step_end_ns = self._last_step_end_ns, end_ns
        gap = step.start_time_ns - last if last is not None else 0
        took = end_ns - step.start_time_ns
        if took + gap >= SLOW_STEP_NS:
            self._slow_steps.append((step.start_time_ns / 1e9, took / 1e6, gap / 1e6, step.phase, step.batch_size))

    def _record_step(self, step: StepInfo, end_ns: int, contexts: list[Any]) -> None:
        span_context = self._tracing.record_step(step, end_ns, contexts,
                                                 {names.GEN_AI_REQUEST_MODEL: self._model_config.name})
        self._notify_observer("finish", step, span_context)

    def _begin(self, seq: Sequence) -> None:
        """Create the decoding state of a sequence that just got a slot; record its queue span."""
        model = self._model
        assert model is not None
        params = seq.request.params
        backend = getattr(model.tokenizer, "backend_tokenizer", model.tokenizer)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                       else frozenset(model.eos_token_ids))
        guide = self._guides.matcher(params.guide) if params.guide is not None and self._guides else None
        sampler = RequestSampler(params, model.device, seed_offset=seq.index, guide=guide)
        if self._sampling is not None:
            self._sampling.admit(seq.slot, sampler)
        seq.state = _DecodeState(sampler=sampler, detokenizer=IncrementalDetokenizer(backend, len(model.tokenizer)),
                                 stop_filter=StopStringFilter(params.stop), stop_token_ids=stop_ids)
        if seq.index == 0:
            admitted_wall = seq.enqueued_wall_ns + (seq.admitted_ns - seq.enqueued_ns)
            self._tracing.record_child(names.QUEUE_SPAN, seq.request.trace_context, seq.enqueued_wall_ns,
                                       admitted_wall, {names.QUEUE_SLOT: seq.slot})

    def _append(self, seq: Sequence, pick: Pick, now: int, echo: LogprobRows | None,
                text_later: bool = False) -> tuple[GenerationOutput, bool]:
        """Add one generated token; return the output that carries it, and whether its text is
        still to be detokenized (``text_later``, allowed when the text cannot end the sequence:
        no stop strings, no grammar; :meth:`_Held.texted` fills it in, in order)."""
        state: _DecodeState = seq.state
        token = pick.token
        seq.token_ids.append(token)
        seq.generated += 1
        if seq.generated == 1:
            seq.first_token_ns = now
            self.metrics.time_to_first_token.observe((now - seq.enqueued_ns) / 1e9)
        reason = None
        text = ""
        guide = state.sampler.guide
        if guide is not None:
            guide.accept(token)
        later = False
        if token in state.stop_token_ids:
            reason = "stop"
        elif text_later and guide is None and not state.stop_filter.watching:
            later = True
        else:
            text = state.stop_filter.push(state.detokenizer.add(token))
            if state.stop_filter.stopped or (guide is not None and guide.done):
                reason = "stop"
        if reason is None and seq.generated >= seq.request.params.max_tokens:
            reason = "length"
        if reason is not None:
            if later:
                text, later = state.stop_filter.push(state.detokenizer.add(token)), False
            text += state.stop_filter.flush()
            if seq.generated > 1:
                self.metrics.time_per_output_token.observe((now - seq.first_token_ns) / 1e9 / (seq.generated - 1))
            self.metrics.finished.labels(reason).inc()
        return GenerationOutput(request_id=seq.request_id, text=text, token_ids=(token,), prompt_tokens=seq.prompt_len,
                                completion_tokens=seq.generated, finished=reason is not None,
                                finish_reason=reason, index=seq.index,
                                logprobs=pick.logprobs,
                                prompt_logprobs=echo if seq.generated == 1 else None), later

    def _retire(self, seq: Sequence) -> None:
        """Free a running sequence's slot (caller holds the lock)."""
        slot = seq.slot
        move = self._scheduler.finish(seq)
        if self._sampling is not None and seq.state is not None:
            self._sampling.release(slot)
        if move is not None:
            if self._runner is not None:
                self._runner.move(move.src, move.dst, move.length)
            if self._sampling is not None:
                self._sampling.move(move.src, move.dst)
        seqs = self._by_id.get(seq.request_id, [])
        if seq in seqs:
            seqs.remove(seq)
        if not seqs:
            self._by_id.pop(seq.request_id, None)
            self._aborts.discard(seq.request_id)
        _report_spent(seq, prefilled=True)

    def _apply_aborts(self) -> None:
        """Drop aborted requests from the queue or the batch (caller holds the lock)."""
        for request_id in list(self._aborts):
            seqs = list(self._by_id.get(request_id, ()))
            self._aborts.discard(request_id)
            for seq in seqs:
                if seq.slot >= 0:
                    self._retire(seq)
                else:
                    self._scheduler.remove_waiting(seq)
                    _report_spent(seq, prefilled=False)
            self._by_id.pop(request_id, None)
            if seqs:
                self.metrics.finished.labels("abort").inc()
                log.info("request %s cancelled after %d tokens; slot freed", request_id,
                         sum(s.generated for s in seqs))

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._deliver(held.texted())
            if held.step is not None:
                self._record_step(held.step, held.end_ns, held.contexts)

    def _deliver(self, deliveries: list[tuple[RequestStream, GenerationOutput]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, GenerationOutput]]] = {}
        for stream, output in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            left = [seq for seqs in self._by_id.values() for seq in seqs]
            sinks = {id(seq.sink): seq.sink for seq in left}
            self._by_id.clear()
        error = EngineDeadError(f"engine failed: {exc}")
        for seq in left:
            _report_spent(seq, prefilled=seq.slot >= 0)
        self._deliver_error(list(sinks.values()), error)

    def _deliver_error(self, streams: list[RequestStream], error: BaseException) -> None:
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream.put, error)
            except RuntimeError:
                pass

    def _notify_observer(self, which: str, step: StepInfo, span_context: Any) -> bool:
        """Tell the forward observer; True when its ``start`` asks for the step's replay timing."""
        if self._observer is None:
            return False
        try:
            if which == "start":
                return bool(self._observer.start(step))
            self._observer.finish(step, span_context)
        except Exception:  # noqa: BLE001 - an observer must never break serving
            log.exception("forward observer %s() failed", which)
        return False

    def _gpu_memory_bytes(self) -> float:
        model = self._model
        if model is None or model.device.type != "cuda":
            return 0.0
        free, total = torch.cuda.mem_get_info(model.device)
        return float(total - free)


def _report_spent(seq: Sequence, prefilled: bool) -> None:
    """Hand the request's final count to its stream's loop (before any output still to deliver)."""
    spent = Spent(seq.prompt_len if prefilled else 0, seq.generated)
    try:
        seq.sink.loop.call_soon_threadsafe(seq.sink.set_spent, spent)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _on_torch_streams(backend: str) -> bool:
    """Whether a backend's kernels all run on torch's current stream (the fused decoder, Hugging Face
    layers; DeepSpeed's injected kernels are left on the default stream)."""
    return backend.startswith("fused") or backend == "hf"


def _grammars(model: LoadedModel) -> Grammars | None:
    """Constrained decoding for this model's tokenizer (None: llguidance missing, or a slow tokenizer)."""
    try:
        return Grammars(model.tokenizer, model.vocab_size, model.eos_token_ids)
    except (ImportError, ValueError) as exc:
        log.warning("response_format json_object/json_schema unavailable: %s", exc)
        return None


def _put_all(items: list[tuple[RequestStream, GenerationOutput]]) -> None:
    for stream, output in items:
        stream.put(output)
