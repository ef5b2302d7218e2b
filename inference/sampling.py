"""Choosing the next token of each row: greedy, or temperature + top-p with a per-request RNG.

Each sampled request owns a ``torch.Generator`` (seeded from the request's ``seed`` when
given), so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import secrets

import torch

from inference.generation import SamplingParams


class RequestSampler:
    """Sampling state of one request."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.greedy = params.temperature == 0.0
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))


def next_tokens(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[int]:
    """Pick one token per row of ``logits`` ``[rows, vocab]``; one device sync in all."""
    choices = logits.argmax(dim=-1)
    sampled_rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if sampled_rows:
        picks = [_sample_row(logits[row], samplers[row]) for row in sampled_rows]
        choices = choices.clone()
        choices[torch.tensor(sampled_rows, device=logits.device)] = torch.stack(picks)
    return choices.tolist()


def _sample_row(logits: torch.Tensor, sampler: RequestSampler) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > sampler.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]
