"""Continuous-batching policy: who waits, who joins the running batch, which slot they get.

Pure bookkeeping, no tensors: at every step boundary the engine asks :meth:`Scheduler.admit`
which waiting sequences join the batch (first come, first served, bounded by the batch
size, the tokens in flight and a prefill budget), and tells :meth:`Scheduler.finish` when
one leaves, getting back the slot move that keeps running slots dense.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inference.config import BatchingConfig
from inference.generation import GenerationRequest, QueueFullError


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request, from submission to its last token."""

    request: GenerationRequest
    sink: Any
    enqueued_ns: int
    enqueued_wall_ns: int
    token_ids: list[int] = field(default_factory=list)
    slot: int = -1
    generated: int = 0
    admitted_ns: int = 0
    first_token_ns: int = 0
    state: Any = None  # the engine's per-request decoding state (sampler, detokenizer, stop filter)
    index: int = 0  # which of the request's ``n`` sequences
    leader: Sequence | None = None  # sequence 0 of the request, whose prefill this one copies (n > 1)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.request.params.max_tokens


@dataclass(frozen=True)
class SlotMove:
    """Copy ``length`` cached tokens from slot ``src`` to slot ``dst``."""

    src: int
    dst: int
    length: int


class Scheduler:
    """FIFO admission into a dense set of slots ``0..len(running)-1``."""

    def __init__(self, batching: BatchingConfig, max_prefill_tokens: int) -> None:
        self._batching = batching
        self._max_prefill_tokens = max_prefill_tokens
        self._max_wait_ns = int(batching.max_wait_ms * 1e6)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tokens_in_flight = 0

    @property
    def capacity(self) -> int:
        return self._batching.max_batch_size + self._batching.max_queue

    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (one, or ``n`` that share a prefill); QueueFullError when
        batch and queue are both full."""
        if len(self.waiting) + len(self.running) + len(seqs) > self.capacity:
            raise QueueFullError(f"server at capacity ({self.capacity} requests running or queued)")
        if len(seqs) > self._batching.max_batch_size:
            raise ValueError(f"{len(seqs)} sequences cannot share a batch of {self._batching.max_batch_size}")
        self.waiting.extend(seqs)

    def admit(self, now_ns: int, draining: bool = False) -> list[Sequence]:
        """Move the sequences that may start now from ``waiting`` to ``running`` (slots assigned).

        A request's ``n`` sequences join together; the ones that are prefilled (leaders) get
        the lower slots, so their prefill covers consecutive slots, and the sequences that copy
        a leader's prefill follow.
        """
        if not self.waiting or self._should_wait(now_ns, draining):
            return []
        admitted: list[Sequence] = []
        prefill_tokens = 0
        while self.waiting:
            group = self._head_group()
            if len(self.running) + len(admitted) + len(group) > self._batching.max_batch_size:
                break
            reserved = sum(s.reserved_tokens for s in group)
            over_budget = self.tokens_in_flight + reserved > self._batching.max_tokens_in_flight
            over_prefill = prefill_tokens + group[0].prompt_len > self._max_prefill_tokens
            if (over_budget and (self.running or admitted)) or (over_prefill and admitted):
                break
            for _ in group:
                self.waiting.popleft()
            self.tokens_in_flight += reserved
            prefill_tokens += group[0].prompt_len
            admitted.extend(group)
        ordered = [s for s in admitted if s.leader is None] + [s for s in admitted if s.leader is not None]
        for seq in ordered:
            seq.slot = len(self.running)
            seq.admitted_ns = now_ns
            self.running.append(seq)
        return ordered

    def can_admit(self, now_ns: int, draining: bool = False) -> bool:
        """Whether :meth:`admit` would admit anything now (it changes nothing)."""
        if not self.waiting or self._should_wait(now_ns, draining):
            return False
        group = self._head_group()
        if len(self.running) + len(group) > self._batching.max_batch_size:
            return False
        reserved = sum(s.reserved_tokens for s in group)
        return not (self.running and self.tokens_in_flight + reserved > self._batching.max_tokens_in_flight)

    def _head_group(self) -> list[Sequence]:
        """The first waiting sequence and the ones that share its prefill."""
        head = self.waiting[0]
        group = [head]
        for seq in itertools.islice(self.waiting, 1, None):
            if seq.leader is not head:
                break
            group.append(seq)
        return group

    def wait_timeout_s(self, now_ns: int) -> float | None:
        """How long the engine may sleep before something is due (None: until woken)."""
        if self.running:
            return 0.0
        if not self.waiting:
            return None
        return max(0.0, (self.waiting[0].enqueued_ns + self._max_wait_ns - now_ns) / 1e9)

    def finish(self, seq: Sequence) -> SlotMove | None:
        """Take a running sequence out; the last running one moves into its slot."""
        index = seq.slot
        last = self.running.pop()
        self.tokens_in_flight -= seq.reserved_tokens
        seq.slot = -1
        if last is seq:
            return None
        self.running[index] = last
        move = SlotMove(src=last.slot, dst=index, length=len(last.token_ids))
        last.slot = index
        return move

    def remove_waiting(self, seq: Sequence) -> bool:
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        for fork in [s for s in self.waiting if s.leader is seq]:  # a leader never runs without its forks
            fork.leader = None
        return True

    def _should_wait(self, now_ns: int, draining: bool) -> bool:
        """Hold a lone request briefly when idle, so a burst is prefilled together."""
        if self.running or draining or len(self.waiting) >= self._batching.max_batch_size:
            return False
        return now_ns - self.waiting[0].enqueued_ns < self._max_wait_ns
