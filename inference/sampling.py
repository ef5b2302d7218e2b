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


def next_tokens(logits: torch.Tensor, samplers: list[RequestSampler],
                counts: PenaltyCounts | None = None) -> list[Pick]:
    """Pick one token per row of ``logits`` ``[rows, vocab]``; one device sync in all."""
    if all(s.plain for s in samplers):
        return [Pick(t) for t in _choose(logits, samplers).tolist()]
    device = logits.device
    rows = len(samplers)
    raw_rows = [row for row, s in enumerate(samplers) if s.logprobs is not None]
    raw = None
    if raw_rows:
        selected = logits if len(raw_rows) == rows else logits[torch.tensor(raw_rows, device=device)]
        raw = selected.float().log_softmax(dim=-1)
    adjusted = _adjust(logits, samplers, counts)
    choices = _choose(adjusted, samplers)
    penalized = [row for row, s in enumerate(samplers) if s.penalized]
    if penalized and counts is not None:
        index = torch.tensor([[r for r in penalized], [samplers[r].counts_row for r in penalized]], device=device)
        counts.table.index_put_((index[1], choices[index[0]]), torch.ones(len(penalized), device=device),
                                accumulate=True)
    if raw is None:
        return [Pick(t) for t in choices.tolist()]
    k = max(samplers[r].logprobs or 0 for r in raw_rows)
    raw_choices = choices if len(raw_rows) == rows else choices[torch.tensor(raw_rows, device=device)]
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


def _adjust(logits: torch.Tensor, samplers: list[RequestSampler], counts: PenaltyCounts | None) -> torch.Tensor:
    """Penalties, bias and grammar masks applied to a copy of the rows that have them."""
    penalized = [row for row, s in enumerate(samplers) if s.penalized]
    biased = [row for row, s in enumerate(samplers) if s.bias is not None]
    guided = [row for row, s in enumerate(samplers) if s.guide is not None]
    if not (penalized or biased or guided):
        return logits
    device = logits.device
    out = logits.float().clone()
    if penalized and counts is not None:
        index = torch.tensor([[r for r in penalized], [samplers[r].counts_row for r in penalized]], device=device)
        table = counts.table[index[1]]
        coefficients = counts.coefficients[index[1]]
        out[index[0]] -= coefficients[:, :1] * table + coefficients[:, 1:] * (table > 0).float()
    for row in biased:
        ids, values = samplers[row].bias  # type: ignore[misc]
        out[row].index_add_(0, ids, values)
    if guided:
        masks = allowed([samplers[r].guide for r in guided], out.shape[1], device)
        index = torch.tensor(guided, device=device)
        out[index] = out[index].masked_fill(~masks, float("-inf"))
    return out


def _choose(logits: torch.Tensor, samplers: list[RequestSampler]) -> torch.Tensor:
    choices = logits.argmax(dim=-1)
    sampled_rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if sampled_rows:
        picks = [_sample_row(logits[row], samplers[row]) for row in sampled_rows]
        choices = choices.clone()
        choices[torch.tensor(sampled_rows, device=logits.device)] = torch.stack(picks)
    return choices


def _sample_row(logits: torch.Tensor, sampler: RequestSampler) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > sampler.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]
