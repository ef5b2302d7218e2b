"""The decision log's lines: every field of the record, nested values included, plus ts and kind."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

from sidecar.config import DecisionLogConfig
from sidecar.decision_log import DecisionLogger, DecisionRecord, SettlementRecord


def test_lines_carry_every_field_in_order_with_nested_values():
    out = io.StringIO()
    logger = DecisionLogger(DecisionLogConfig(), stream=out)
    rate_limit = {"backend": "memory", "degraded": False, "reserved": 23,
                  "budgets": {"tokens": {"limit": 1000, "remaining": 977}}}
    decision = DecisionRecord("d" * 32, "req-1", "acme", "api_key", "POST", "/v1/completions", "allow", 200,
                              "allowed", 0.25, False, "rev", rate_limit=rate_limit, identity_issuer=None)
    settlement = SettlementRecord("d" * 32, "acme", "settled", "stop", 7, 9, 23, 16, 7, "memory")
    logger.write(decision)
    logger.write(settlement)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    for line, record, kind in ((first, decision, "decision"), (second, settlement, "settlement")):
        assert line.pop("kind") == kind and isinstance(line.pop("ts"), float)
        assert line == asdict(record) and list(line) == list(asdict(record))
    assert rate_limit == {"backend": "memory", "degraded": False, "reserved": 23,
                          "budgets": {"tokens": {"limit": 1000, "remaining": 977}}}  # not changed by writing


def test_a_disabled_log_writes_nothing():
    out = io.StringIO()
    logger = DecisionLogger(DecisionLogConfig(enabled=False), stream=out)
    assert not logger.enabled
    logger.write(DecisionRecord("d" * 32, "", None, "invalid", "GET", "/", "deny", 401, "missing", 0.1, False, ""))
    assert out.getvalue() == ""
