"""Choosing the next token of each row, and the log-probabilities the client asked for.

In: a step's logits ``[rows, vocab]`` and one :class:`RequestSampler` per row. Out: one
:class:`Pick` per row (the token, and its log-probability and top alternatives when asked).

Per row, in order: OpenAI's presence/frequency penalties over the tokens the sequence
generated so far, ``logit_bias``, the grammar mask of constrained decoding (llguidance),
then greedy argmax, or temperature + top-p with the request's own ``torch.Generator``
(seeded from ``seed`` when given), so a row's tokens do not depend on which other requests
share the batch. Rows with none of these options take the fast path of before: one argmax
over the batch, untouched logits (so greedy stays identical to Hugging Face ``generate``).
Log-probabilities are those of the model: log-softmax of the raw logits in fp32, before
any of the adjustments (as vLLM reports them by default). Everything the host needs comes
back in one device sync per step.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

from inference.generation import SamplingParams, TokenLogprobs
from inference.structured import allowed


@dataclass(frozen=True)
class Pick:
    token: int
    logprobs: TokenLogprobs | None = None


class PenaltyCounts:
    """How often each sequence generated each token: one row of ``[rows, vocab]`` per penalized sequence.

    Rows are leased to sequences (not tied to batch slots, which move), with the sequence's
    two coefficients beside them, so one gather reads a step's counts and coefficients and
    one scatter-add updates the counts: a handful of kernels per step, however many rows.
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.table = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        self.coefficients = torch.zeros(rows, 2, dtype=torch.float32, device=device)  # frequency, presence
        self._free = list(range(rows - 1, -1, -1))

    def lease(self, frequency: float, presence: float) -> int:
        row = self._free.pop()
        self.table[row].zero_()
        self.coefficients[row] = torch.tensor([frequency, presence])
        return row

    def release(self, row: int) -> None:
        self._free.append(row)


class RequestSampler:
    """Sampling state of one sequence."""

    def __init__(self, params: SamplingParams, device: torch.device, *, seed_offset: int = 0,
                 counts: PenaltyCounts | None = None, guide: Any = None) -> None:
        self.greedy = params.temperature == 0.0
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.logprobs = params.logprobs
        self.plain = params.plain
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed + seed_offset if params.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed)
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self._counts = counts if (self.presence or self.frequency) else None
        self.counts_row = self._counts.lease(self.frequency, self.presence) if self._counts is not None else -1
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))
        self.guide = guide  # a GrammarMatcher (inference.structured), or None

    @property
    def penalized(self) -> bool:
        return self.counts_row >= 0

    def close(self) -> None:
        """Give back the penalty row (the sequence left the batch)."""
        if self._counts is not None and self.counts_row >= 0:
            self._counts.release(self.counts_row)
            self.counts_row = -1


class SamplingBuffers:
    """What the sampler keeps on the device across steps: the penalty counts, and a pinned buffer
    that carries a step's row indices to the device in one asynchronous copy (a tensor built
    from a Python list would be a blocking copy that waits for the step's forward pass)."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.counts = PenaltyCounts(rows, vocab_size, device)
        self.device = device
        self._staging = torch.zeros(5 * rows, dtype=torch.long, pin_memory=device.type == "cuda")

    def stage(self, *lists: list[int]) -> list[torch.Tensor]:
        """The lists as device tensors. The buffer is reused at the next step, after the step's
        results were copied back (which waits for this copy too)."""
        flat = [i for values in lists for i in values]
        if len(flat) > self._staging.numel():
            self._staging = torch.zeros(2 * len(flat), dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._staging[:len(flat)] = torch.tensor(flat, dtype=torch.long)
        staged = self._staging[:len(flat)].to(self.device, non_blocking=True)
        out, start = [], 0
        for values in lists:
            out.append(staged[start:start + len(values)])
            start += len(values)
        return out


def next_tokens(logits: torch.Tensor, samplers: list[RequestSampler],
                buffers: SamplingBuffers | None = None) -> list[Pick]:
    """Pick one token per row of ``logits`` ``[rows, vocab]``; one device sync in all."""
    if all(s.plain for s in samplers):
        return [Pick(t) for t in _choose(logits, samplers).tolist()]
    if buffers is None:
        buffers = SamplingBuffers(len(samplers), logits.shape[1], logits.device)
    rows = len(samplers)
    raw_rows = [row for row, s in enumerate(samplers) if s.logprobs is not None]
    penalized = [row for row, s in enumerate(samplers) if s.penalized]
    guided = [row for row, s in enumerate(samplers) if s.guide is not None]
    sampled = [row for row, s in enumerate(samplers) if not s.greedy]
    partial_raw = raw_rows if 0 < len(raw_rows) < rows else []
    raw_index, pen_index, pen_table, guided_index, sampled_index = buffers.stage(
        partial_raw, penalized, [samplers[r].counts_row for r in penalized], guided, sampled)
    raw = None
    if raw_rows:
        raw = (logits[raw_index] if partial_raw else logits).float().log_softmax(dim=-1)
    adjusted = logits
    if penalized or guided or any(s.bias is not None for s in samplers):
        adjusted = logits.float().clone()
        if penalized:
            table = buffers.counts.table[pen_table]
            coefficients = buffers.counts.coefficients[pen_table]
            adjusted[pen_index] -= coefficients[:, :1] * table + coefficients[:, 1:] * (table > 0).float()
        for row, sampler in enumerate(samplers):
            if sampler.bias is not None:
                ids, values = sampler.bias
                adjusted[row].index_add_(0, ids, values)
        if guided:
            masks = allowed([samplers[r].guide for r in guided], adjusted.shape[1], logits.device)
            adjusted[guided_index] = adjusted[guided_index].masked_fill(~masks, float("-inf"))
    choices = _choose(adjusted, samplers, sampled_index)
    if penalized:  # each row once: a scatter-add into the flat table, no sort
        vocab = buffers.counts.table.shape[1]
        buffers.counts.table.view(-1).scatter_add_(
            0, pen_table * vocab + choices[pen_index], torch.ones(len(penalized), device=logits.device))
    if raw is None:
        return [Pick(t) for t in choices.tolist()]
    k = max(samplers[r].logprobs or 0 for r in raw_rows)
    raw_choices = choices[raw_index] if partial_raw else choices
    chosen = raw.gather(1, raw_choices.view(-1, 1)).view(-1)
    top_values, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    # One copy to the host: tokens, chosen log-probabilities, top values and ids (ids < 2^53 in fp64).
    packed = torch.cat([choices.double(), chosen.double(), top_values.double().flatten(),
                        top_ids.double().flatten()]).tolist()
    n = len(raw_rows)
    tokens = [int(t) for t in packed[:rows]]
    chosen_l = packed[rows:rows + n]
    top_v = packed[rows + n:rows + n + n * k]
    top_i = packed[rows + n + n * k:]
    picks = [Pick(t) for t in tokens]
    for j, row in enumerate(raw_rows):
        want = samplers[row].logprobs or 0
        top = tuple((int(top_i[j * k + c]), top_v[j * k + c]) for c in range(want))
        picks[row] = Pick(tokens[row], (tokens[row], chosen_l[j], top))
    return picks


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> tuple[TokenLogprobs, ...]:
    """Log-probabilities of a prompt's tokens from the prefill's logits ``[len, vocab]`` (position i
    predicts token i+1); the first token has none (None, no alternatives)."""
    raw = logits[:-1].float().log_softmax(dim=-1)
    ids = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device).view(-1, 1)
    chosen = raw.gather(1, ids).view(-1).tolist()
    top_v, top_i = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
    out: list[TokenLogprobs] = [(prompt[0], None, ())]
    for i, token in enumerate(prompt[1:]):
        out.append((token, chosen[i], tuple(zip(top_i_l[i], top_v_l[i]))))
    return tuple(out)


def _choose(logits: torch.Tensor, samplers: list[RequestSampler],
            sampled_index: torch.Tensor | None = None) -> torch.Tensor:
    choices = logits.argmax(dim=-1)
    sampled_rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if sampled_rows:
        picks = [_sample_row(logits[row], samplers[row]) for row in sampled_rows]
        choices = choices.clone()
        if sampled_index is None:
            sampled_index = torch.tensor(sampled_rows, device=logits.device)
        choices[sampled_index] = torch.stack(picks)
    return choices


def _sample_row(logits: torch.Tensor, sampler: RequestSampler) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > sampler.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]
