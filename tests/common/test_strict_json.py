"""common/strict_json: RFC 8259 JSON in (no NaN/Infinity) and out (orjson, json.dumps where it cannot)."""

from __future__ import annotations

import json

import pytest

from common import strict_json


def test_loads_refuses_what_json_does_not_define() -> None:
    for text in ("NaN", '{"a": Infinity}', "[1e999]"):
        with pytest.raises(ValueError):
            strict_json.loads(text)
    assert strict_json.loads('{"a": [1, 2.5, "é"]}') == {"a": [1, 2.5, "é"]}


def test_dumps_matches_json_and_sorts_when_asked() -> None:
    value = {"b": [1, 2.5, None, True, "é\\n"], "a": {"z": 1, "y": {1: "int key"}}, "s": {"only"}}
    expected = json.loads(json.dumps(value, default=str))
    assert json.loads(strict_json.dumps(value)) == expected
    assert strict_json.dumps(value, sort_keys=True) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False).encode()
    # integers orjson refuses (beyond 64 bits) still encode, as json.dumps writes them
    huge = {"max_tokens": 10**30, "n": -(2**70)}
    assert json.loads(strict_json.dumps(huge)) == huge
    assert strict_json.dumps(huge, sort_keys=True) == b'{"max_tokens":1000000000000000000000000000000,"n":-1180591620717411303424}'
