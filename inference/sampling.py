"""Choosing the next token of each row, and the log-probabilities the client asked for.

In: a step's logits ``[rows, vocab]`` (row ``i`` = KV-cache slot ``first_slot + i``) and one
:class:`RequestSampler` per row. Out: one :class:`Pick` per row (the token, and its
log-probability and top alternatives when asked).

Per row, in order: OpenAI's presence/frequency penalties over the tokens the sequence
generated so far, ``logit_bias``, the grammar mask of constrained decoding (llguidance),
then greedy argmax, or temperature + top-p with the request's own ``torch.Generator``
(seeded from ``seed`` when given), so a row's tokens do not depend on which other requests
share the batch. Log-probabilities are those of the model: log-softmax of the raw logits in
fp32, before any of the adjustments (as vLLM reports them by default).

Cost by design (#20: the options must not slow decoding down): what a request asks for is
written ONCE, when it gets its slot, into per-slot device tensors of :class:`SlotSampling`
(penalty coefficients, a dense ``logit_bias`` row, and the counts of generated tokens, which
every step updates in place with one scatter-add of the step's tokens). A step then applies
penalties, bias and log-probabilities to the whole batch at once (a row without the option
has zero coefficients and a zero bias row, so it is untouched: greedy stays identical to
Hugging Face ``generate``), with the same handful of kernels whatever the batch size, no
index list built from Python and no host-to-device copy; the step's tokens, chosen
log-probabilities and top-k alternatives come back in ONE device-to-host copy into a pinned
buffer (one wait, with the GIL released); on CUDA the log-probabilities and top-k are two Triton
launches that never write the vocabulary-wide log-softmax (:mod:`inference.triton_logprobs`).
Each row's log-probabilities leave as a one-row view of the step's table
(:class:`~inference.generation.LogprobRows`): no Python object per alternative on the engine
thread; token ids become text on the event loop, once per response or streamed delta.
Only temperature sampling (a generator per request) and grammar masks (llguidance, on the
host) still work row by row, and only for the rows that use them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import secrets
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import torch

from inference.generation import LogprobRows, SamplingParams
from inference.structured import allowed

log = logging.getLogger(__name__)

EXACT_IDS = 2 ** 24  # token ids below this are exact in fp32, so one fp32 table carries ids and values


class Pick(NamedTuple):
    """What a step chose for one row (a named tuple: 16 a step are made on the engine thread)."""

    token: int
    logprobs: LogprobRows | None = None  # one row, when the sequence asked for log-probabilities


@functools.lru_cache(maxsize=64)
def _columns(k: int, want: int) -> np.ndarray:
    """Columns of a ``[rows, 2 + 2k]`` table that make a ``[rows, 2 + 2 want]`` one (want <= k)."""
    return np.r_[0, 1, 2:2 + want, 2 + k:2 + k + want]


class RequestSampler:
    """Sampling options of one sequence, as the host needs them (its device state lives in :class:`SlotSampling`)."""

    def __init__(self, params: SamplingParams, device: torch.device, *, seed_offset: int = 0,
                 guide: Any = None) -> None:
        self.greedy = params.temperature == 0.0
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.logprobs = params.logprobs
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed + seed_offset if params.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed)
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.logit_bias = params.logit_bias
        self.guide = guide  # a GrammarMatcher (inference.structured), or None

    @property
    def penalized(self) -> bool:
        return bool(self.presence or self.frequency)


class SlotSampling:
    """The sampler's state on the device, one row per KV-cache slot, and the host's tally of it.

    The engine calls :meth:`admit` when a sequence gets a slot, :meth:`release` when it leaves
    and :meth:`move` when the scheduler moves a sequence to another slot (as it moves the KV
    cache); :meth:`pick` chooses a step's tokens. The tallies (how many running sequences are
    penalized, biased, guided, sampled, and which ``logprobs`` they want) tell a step which
    kernels to run without looking at its rows. ``counts`` and ``bias`` (``[slots, vocab]``
    fp32 each) are allocated the first time a request uses them.
    """

    def __init__(self, slots: int, vocab_size: int, device: torch.device, *, logits_dtype: torch.dtype = torch.float32,
                 fused_logprobs: bool | None = None) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self._slots: list[RequestSampler | None] = [None] * slots
        self._counts: torch.Tensor | None = None   # [slots, vocab]: tokens generated so far
        self._penalty: torch.Tensor | None = None  # [slots, 2]: frequency, presence
        self._bias: torch.Tensor | None = None     # [slots, vocab]: logit_bias, dense
        self._penalty_rows: set[int] = set()       # slots whose device penalty row is not zero
        self._bias_rows: set[int] = set()          # slots whose device bias row is not zero
        self._ones = torch.ones(slots, 1, dtype=torch.float32, device=device)
        self._penalized = self._biased = self._guided = self._sampled = 0
        self._logprobs: Counter[int] = Counter()   # logprobs (alternatives wanted) -> running sequences
        if vocab_size > EXACT_IDS:
            raise ValueError(f"a vocabulary of {vocab_size} tokens: ids above 2^24 do not fit the fp32 result table")
        self._pin = device.type == "cuda"
        # Two sets of pinned host buffers, used by turns: a step may be launched while the one
        # before it is still unread (pipelined decode), and neither may overwrite the other's.
        self._turns = [_Turn(slots, self._pin), _Turn(slots, self._pin)]
        self._turn = 0
        self.host_syncs = 0  # device-to-host waits so far (one per step; tests count them)
        # log-probabilities through the Triton kernels: by default on CUDA where Triton is installed
        self.fused_logprobs = (device.type == "cuda" and importlib.util.find_spec("triton") is not None
                               if fused_logprobs is None else fused_logprobs)
        self._scratch: Any = None  # inference.triton_logprobs.Scratch, when the kernels are in use
        if self.fused_logprobs:  # compiled now, not on the first request that asks for logprobs
            try:
                from inference.triton_logprobs import Scratch

                self._scratch = Scratch()
                self._logprob_table(torch.zeros(1, vocab_size, dtype=logits_dtype, device=device),
                                    torch.zeros(1, dtype=torch.long, device=device), 1)
            except Exception:
                if fused_logprobs:
                    raise
                log.exception("the Triton logprobs kernels failed to compile: log-probabilities op by op in torch")
                self.fused_logprobs = False
        log.info("log-probabilities: %s", "Triton kernels" if self.fused_logprobs else "torch ops")

    # -- membership (engine thread, between steps) -------------------------------------------

    def admit(self, slot: int, sampler: RequestSampler) -> None:
        """Write ``sampler``'s options into ``slot``'s rows (a few small kernels, no host copy but the bias)."""
        self._slots[slot] = sampler
        self._tally(sampler, 1)
        if sampler.penalized:
            counts, penalty = self._penalty_tensors()
            counts[slot].zero_()
            penalty[slot, 0].fill_(sampler.frequency)
            penalty[slot, 1].fill_(sampler.presence)
            self._penalty_rows.add(slot)
        elif slot in self._penalty_rows:
            assert self._penalty is not None
            self._penalty[slot].zero_()
            self._penalty_rows.discard(slot)
        if sampler.logit_bias:
            bias = self._bias_tensor()
            ids, values = zip(*sampler.logit_bias)
            bias[slot].zero_()
            bias[slot].index_add_(0, torch.tensor(ids, dtype=torch.long).to(self.device),
                                  torch.tensor(values, dtype=torch.float32).to(self.device))
            self._bias_rows.add(slot)
        elif slot in self._bias_rows:
            assert self._bias is not None
            self._bias[slot].zero_()
            self._bias_rows.discard(slot)

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` left the batch (its device rows are cleared by the next admit)."""
        sampler = self._slots[slot]
        if sampler is not None:
            self._tally(sampler, -1)
            self._slots[slot] = None

    def move(self, src: int, dst: int) -> None:
        """The sequence in slot ``src`` now runs in slot ``dst`` (which was released)."""
        self._slots[dst], self._slots[src] = self._slots[src], None
        for rows, tensors in ((self._penalty_rows, (self._penalty, self._counts)), (self._bias_rows, (self._bias,))):
            if src in rows:
                for tensor in tensors:
                    assert tensor is not None
                    tensor[dst].copy_(tensor[src])
                rows.add(dst)
            elif dst in rows:
                tensors[0][dst].zero_()  # type: ignore[index]
                rows.discard(dst)

    def _tally(self, sampler: RequestSampler, sign: int) -> None:
        self._penalized += sign * sampler.penalized
        self._biased += sign * bool(sampler.logit_bias)
        self._guided += sign * (sampler.guide is not None)
        self._sampled += sign * (not sampler.greedy)
        if sampler.logprobs is not None:
            self._logprobs[sampler.logprobs] += sign
            if not self._logprobs[sampler.logprobs]:
                del self._logprobs[sampler.logprobs]

    def _penalty_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._penalty is None:
            slots = len(self._slots)
            self._counts = torch.zeros(slots, self.vocab_size, dtype=torch.float32, device=self.device)
            self._penalty = torch.zeros(slots, 2, dtype=torch.float32, device=self.device)
        return self._counts, self._penalty

    def _bias_tensor(self) -> torch.Tensor:
        if self._bias is None:
            self._bias = torch.zeros(len(self._slots), self.vocab_size, dtype=torch.float32, device=self.device)
        return self._bias

    # -- a step --------------------------------------------------------------------------------

    @property
    def host_bound(self) -> bool:
        """Whether a running sequence's next choice needs the host to have read its previous one
        (a grammar mask: llguidance accepts each token on the host before it masks the next step),
        so a step may not be launched before the previous step's tokens are read."""
        return bool(self._guided)

    def pick(self, logits: torch.Tensor, first_slot: int, samplers: list[RequestSampler]) -> list[Pick]:
        """One token per row of ``logits`` ``[rows, vocab]`` (row i = slot ``first_slot + i``); one host sync."""
        return self.launch(logits, first_slot, samplers).result()

    def launch(self, logits: torch.Tensor, first_slot: int, samplers: list[RequestSampler]) -> PendingPicks:
        """Queue the choice of one token per row on the device, and its copy to the host, without
        waiting: :attr:`PendingPicks.tokens` (on the device) can feed the next step before
        :meth:`PendingPicks.result` reads them. At most two launches may be unread at a time."""
        turn = self._turns[self._turn]
        if turn.pending is not None and not turn.pending.read:
            raise RuntimeError("a third step's choice launched before the first one's was read")
        self._turn ^= 1
        rows = logits.shape[0]
        top_k = max(self._logprobs) if self._logprobs else None
        adjusted = self._adjusted(logits, slice(first_slot, first_slot + rows))
        guided: list[int] = []
        sampled: list[int] = []
        if self._guided or self._sampled:  # the options that work row by row, for their rows only
            guided = [row for row, s in enumerate(samplers) if s.guide is not None]
            sampled = [row for row, s in enumerate(samplers) if not s.greedy]
        guided_index, sampled_index = self._stage(turn, guided, sampled)
        if guided:
            adjusted = self._masked(adjusted, logits, [samplers[row] for row in guided], guided_index)
        choices = adjusted.argmax(dim=-1)
        if sampled:
            choices = choices.clone()
            choices[sampled_index] = torch.stack([_sample_row(adjusted[row], samplers[row]) for row in sampled])
        if self._penalized:  # each row's count of its new token, in place (a plain row's counts are unused)
            assert self._counts is not None
            self._counts[first_slot:first_slot + rows].scatter_add_(1, choices.view(-1, 1), self._ones[:rows])
        values = choices if top_k is None else self._logprob_table(logits, choices, top_k)
        turn.pending = PendingPicks(self, choices, turn.to_host(values), turn.copied, samplers, top_k)
        return turn.pending

    def _picks(self, table: np.ndarray, samplers: list[RequestSampler], top_k: int) -> list[Pick]:
        """The step's picks from its host table ``[rows, 2 + 2 top_k]`` (the pinned buffer, reused
        next step): per distinct ``logprobs`` value, ONE copy of the columns those rows asked for
        (token, log-probability, their ``logprobs`` best values and ids), and each row's
        :class:`LogprobRows` a one-row view of it. No Python object per alternative here: the
        serving layer reads the blocks when it frames the response."""
        tokens = table[:, 0].astype(np.int64).tolist()
        blocks: dict[int, np.ndarray] = {}
        picks = []
        for row, (sampler, token) in enumerate(zip(samplers, tokens)):
            want = sampler.logprobs
            if want is None:
                picks.append(Pick(token))
                continue
            block = blocks.get(want)
            if block is None:
                # a copy (the pinned buffer is reused next step): whole, or the columns this ``logprobs`` wants
                block = blocks[want] = table.copy() if want == top_k else table[:, _columns(top_k, want)]
            picks.append(Pick(token, LogprobRows(block[row:row + 1])))
        return picks

    def _logprob_table(self, logits: torch.Tensor, choices: torch.Tensor, k: int) -> torch.Tensor:
        """``[rows, 2 + 2k]`` fp32: each row's token, its log-probability, the top ``k`` log-probabilities
        and their ids. The top k of the logits are the top k of the log-probabilities (log-softmax
        subtracts one logsumexp per row), so on CUDA two Triton launches (:mod:`inference.triton_logprobs`)
        do it without writing the vocabulary-wide log-softmax; elsewhere (CPU) torch op by op."""
        if self.fused_logprobs:
            from inference.triton_logprobs import logprob_table

            return logprob_table(logits, choices, k, self._scratch)
        raw = logits.log_softmax(dim=-1, dtype=torch.float32)  # the cast fused into the kernel
        parts = [choices.view(-1, 1).float(), raw.gather(1, choices.view(-1, 1))]
        if k:
            top_values, top_ids = raw.topk(k, dim=-1)
            parts += [top_values, top_ids.float()]  # ids < 2^24: exact in fp32
        return torch.cat(parts, dim=1)

    def _adjusted(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Penalties and bias over the whole batch (out of place: ``logits`` stays the model's)."""
        adjusted = logits
        if self._penalized:
            assert self._counts is not None and self._penalty is not None
            counts, penalty = self._counts[rows], self._penalty[rows]
            # fp16 logits minus the fp32 penalty is fp32 (type promotion: no separate cast kernel)
            adjusted = adjusted - torch.addcmul(counts * penalty[:, :1], counts.sign(), penalty[:, 1:])
        if self._biased:
            assert self._bias is not None
            adjusted = adjusted + self._bias[rows]
        return adjusted

    def _masked(self, adjusted: torch.Tensor, logits: torch.Tensor, guided: list[RequestSampler],
                index: torch.Tensor) -> torch.Tensor:
        """The grammar masks of the guided rows (llguidance computes them on the host, row by row)."""
        adjusted = adjusted.float()
        if adjusted is logits:
            adjusted = adjusted.clone()
        masks = allowed([sampler.guide for sampler in guided], adjusted.shape[1], logits.device)
        adjusted[index] = adjusted[index].masked_fill(~masks, float("-inf"))
        return adjusted

    def _stage(self, turn: _Turn, *lists: list[int]) -> list[torch.Tensor]:
        """Short lists of row indices on the device, in one copy through ``turn``'s pinned buffer (not
        a blocking copy). The buffer is rewritten two launches later, after this step's results
        came back (the wait in :meth:`PendingPicks.result` covers this copy, enqueued before it)."""
        flat = [i for values in lists for i in values]
        if not flat:
            return [turn.staging[:0]] * len(lists)
        if len(flat) > turn.staging.numel():
            turn.staging = torch.zeros(2 * len(flat), dtype=torch.long, pin_memory=self._pin)
        turn.staging[:len(flat)] = torch.tensor(flat, dtype=torch.long)
        staged = turn.staging[:len(flat)].to(self.device, non_blocking=True)
        out, start = [], 0
        for values in lists:
            out.append(staged[start:start + len(values)])
            start += len(values)
        return out


class PendingPicks:
    """A step's choices, queued on the device and not read yet.

    ``tokens`` (``[rows]`` int64, on the device) can be the next step's inputs at once;
    :meth:`result` waits for the copy to the host (once) and returns the picks.
    """

    def __init__(self, sampling: SlotSampling, tokens: torch.Tensor, host: torch.Tensor,
                 copied: torch.cuda.Event | None, samplers: list[RequestSampler], top_k: int | None) -> None:
        self.tokens = tokens
        self._sampling = sampling
        self._host = host
        self._copied = copied
        self._samplers = samplers
        self._top_k = top_k
        self._picks: list[Pick] | None = None

    @property
    def read(self) -> bool:
        return self._picks is not None

    def result(self) -> list[Pick]:
        """One wait (the GIL released while the device finishes the step), then the picks. The host
        buffer is reused two launches later: it is read here, before that can happen."""
        if self._picks is None:
            self._sampling.host_syncs += 1
            if self._copied is not None:
                self._copied.synchronize()
            if self._top_k is None:
                self._picks = [Pick(token) for token in self._host.tolist()]
            else:
                self._picks = self._sampling._picks(self._host.numpy(), self._samplers, self._top_k)
        return self._picks


class _Turn:
    """One set of the sampler's pinned host buffers (results, row indices) and the event of its copy."""

    def __init__(self, slots: int, pin: bool) -> None:
        self._pin = pin
        self.host: dict[torch.dtype, torch.Tensor] = {}  # pinned buffers a step's results are copied into
        self.copied = torch.cuda.Event() if pin else None
        self.staging = torch.zeros(2 * slots, dtype=torch.long, pin_memory=pin)
        self.pending: PendingPicks | None = None

    def to_host(self, values: torch.Tensor) -> torch.Tensor:
        """``values``' copy on the host, queued (asynchronous, into a pinned buffer) and not waited
        for; on the CPU the values are already there."""
        if values.device.type == "cpu":
            return values
        buffer = self.host.get(values.dtype)
        if buffer is None or buffer.numel() < values.numel():
            buffer = self.host[values.dtype] = torch.empty(max(values.numel(), 64), dtype=values.dtype,
                                                           pin_memory=self._pin)
        host = buffer[:values.numel()].view(values.shape)
        host.copy_(values, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return host


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> LogprobRows:
    """Log-probabilities of a prompt's tokens from the prefill's logits ``[len, vocab]`` (position i
    predicts token i+1), as one block; the first token has none (a NaN log-probability, no alternatives)."""
    raw = logits[:-1].float().log_softmax(dim=-1)
    ids = torch.tensor(prompt, dtype=torch.long, device=logits.device).view(-1, 1)
    parts = [ids[1:].float(), raw.gather(1, ids[1:])]
    if k:
        top_values, top_ids = raw.topk(k, dim=-1)
        parts += [top_values, top_ids.float()]
    block = np.zeros((len(prompt), 2 + 2 * k), dtype=np.float32)
    block[0, :2] = prompt[0], np.nan  # alternatives zero: only the NaN says "none"
    block[1:] = torch.cat(parts, dim=1).cpu().numpy()
    return LogprobRows(block)


def _sample_row(logits: torch.Tensor, sampler: RequestSampler) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > sampler.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]
