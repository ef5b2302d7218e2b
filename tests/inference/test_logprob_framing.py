"""Log-probability blocks framed for the client (inference.openai.serving.TokenTexts.columns):
the vectorised path (whole responses) and the per-row path (streamed deltas) give the same
columns, -inf is floored, a prompt's first token has no log-probability and no alternatives."""

from __future__ import annotations

import numpy as np

from inference.demo_tokenizer import build_demo_tokenizer
from inference.generation import LogprobRows
from inference.openai.serving import LOGPROB_FLOOR, TokenTexts


def blocks(k: int, rows: int) -> list[LogprobRows]:
    rng = np.random.default_rng(k)
    first = np.zeros((1, 2 + 2 * k), np.float32)
    first[0, :2] = 104, np.nan
    out = [LogprobRows(first)]
    for i in range(rows):
        row = np.zeros((1, 2 + 2 * k), np.float32)
        row[0, 0] = rng.integers(0, 259)
        row[0, 1] = -np.inf if i == 3 else -rng.random() * 5
        row[0, 2:2 + k] = np.sort(-rng.random(k) * 5)[::-1]
        row[0, 2 + k:] = rng.integers(0, 259, k)
        out.append(LogprobRows(row))
    return out


def test_whole_and_streamed_columns_agree() -> None:
    texts = TokenTexts(build_demo_tokenizer())
    for k in (0, 1, 5):
        parts = blocks(k, 20)
        whole = texts.columns(parts)  # 21 rows: the numpy path
        streamed = [texts.columns([p]) for p in parts]  # one row each: the plain-Python path
        assert whole.tokens == [t for c in streamed for t in c.tokens]
        assert whole.logprobs == [v for c in streamed for v in c.logprobs]
        assert whole.top == [t for c in streamed for t in c.top]
        assert whole.logprobs[0] is None and whole.top[0] is None  # the prompt's first token
        assert whole.tokens[0] == "h"
        assert whole.logprobs[4] == LOGPROB_FLOOR
        assert all(len(top) == k for top in whole.top[1:])
        entries = LogprobRows.concat(parts).entries()
        assert [e[0] for e in entries[1:]] == [int(p.array[0, 0]) for p in parts[1:]]
        assert [texts(t) for t, _ in entries[5][2]] == [s for s, _ in whole.top[5]]
        assert all(isinstance(v, float) for v in whole.logprobs[1:])
