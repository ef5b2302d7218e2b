"""JSON as RFC 8259 defines it: no NaN, no Infinity, no number that overflows to infinity.

Python's ``json.loads`` accepts all three; OPA, Wasm policies and OpenAI clients do not,
so a body carrying them is rejected as invalid JSON (a 400) rather than failing later.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity; raises ValueError (or RecursionError when nested too deeply)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
