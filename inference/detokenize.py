"""Token ids to text, one step at a time, and stop strings applied to that text.

Decoding only a short window per step (instead of the whole completion) keeps the cost
per token constant; holding back text that could still become a stop string keeps a
stream from ever showing part of a stop sequence.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas (waits out split UTF-8 bytes)."""

    def __init__(self, backend: Any, vocab_size: int) -> None:
        self._backend = backend
        self._vocab_size = vocab_size
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (may be empty)."""
        if 0 <= token_id < self._vocab_size:
            self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True) if ids else ""


class StopStringFilter:
    """Accumulates completion text, cuts it at the first stop string, releases safe text."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._released = 0
        self.stopped = False

    @property
    def watching(self) -> bool:
        """Whether there are stop strings to look for (else the text cannot end a sequence)."""
        return bool(self._stop)

    def push(self, delta: str) -> str:
        """Add new text; return what can be shown now. Sets ``stopped`` when a stop string appears."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        if self._stop:
            cut = self._first_stop(start)
            if cut is not None:
                self._text = self._text[:cut]
                self.stopped = True
                return self.flush()
            safe = len(self._text) - self._held_back()
            out, self._released = self._text[self._released:safe], max(self._released, safe)
            return out
        out, self._released = self._text[self._released:], len(self._text)
        return out

    def flush(self) -> str:
        """Release everything still held back (at the end of the sequence)."""
        out, self._released = self._text[self._released:], len(self._text)
        return out

    def _first_stop(self, start: int) -> int | None:
        found = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
