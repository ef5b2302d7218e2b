"""JSON as RFC 8259 defines it: no NaN, no Infinity, no number that overflows to infinity.

Python's ``json.loads`` accepts all three; OPA, Wasm policies and OpenAI clients do not,
so a body carrying them is rejected as invalid JSON (a 400) rather than failing later.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# One decoder for every call: json.loads with these hooks would build a new one each time.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity; raises ValueError (or RecursionError when nested too deeply)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    return _DECODER.decode(text)


def dumps(value: Any, sort_keys: bool = False) -> bytes:
    """Compact JSON bytes, with orjson (~10x json.dumps on the check path's documents).

    Keys that are not strings are written as strings and anything else orjson cannot write
    (a set, say) as its ``str()``, as ``json.dumps(default=str)`` would; integers beyond 64
    bits, which orjson refuses, go through ``json.dumps`` (same JSON, slower).
    """
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(value, option=option, default=str)
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), default=str,
                          ensure_ascii=False).encode()
