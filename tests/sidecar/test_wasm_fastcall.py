"""Unchecked Wasm export calls: in use, and the same answers as wasmtime's checked calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import wasmtime
from opapywasm import OpaWasmPolicy, PolicyConfig

from common.processes import ROOT
from kernelgate.policy_bundle import build_wasm_bundle
from sidecar import wasm_fastcall
from sidecar.config import OpaConfig
from sidecar.opa_wasm import read_bundle

DOCS = [
    {"attributes": {"request": {"http": {"method": "POST", "headers": {"x-user": "user-1"}}}},
     "parsed_path": ["v1", "completions"], "parsed_body": {"model": "gpt2", "max_tokens": 16}},
    {"attributes": {"request": {"http": {"method": "POST", "headers": {"x-user": "mallory"}}}},
     "parsed_path": ["v1", "completions"], "parsed_body": {"model": "gpt2", "max_tokens": 16}},
    {"attributes": {"request": {"http": {"method": "GET", "headers": {}}}}, "parsed_path": []},
]


def _policy(tmp_path: Path, accelerated: bool) -> OpaWasmPolicy:
    src = tmp_path / f"src{accelerated}"
    src.mkdir()
    shutil.copy(ROOT / "bench/gateway_policies/policy_only.rego", src / "policy.rego")
    wasm, data, _ = read_bundle(str(build_wasm_bundle(src, tmp_path / f"b{accelerated}.tar.gz",
                                                      OpaConfig().policy_path)))
    policy = OpaWasmPolicy.from_wasm_bytes(wasm, config=PolicyConfig(pool_size=1,
                                                                     default_entrypoint="envoy/authz/result"))
    if accelerated:
        assert wasm_fastcall.accelerate(policy)
    policy.set_data(data)
    return policy


def test_accelerated_policy_answers_as_the_checked_one(tmp_path: Path) -> None:
    fast, slow = _policy(tmp_path, True), _policy(tmp_path, False)
    answers = [fast.evaluate(doc) for doc in DOCS * 3]
    assert answers == [slow.evaluate(doc) for doc in DOCS * 3]
    assert answers[0]["allowed"] is True and answers[1]["allowed"] is False
    with fast._pool.borrow() as loan:
        runtime = loan._runtime if hasattr(loan, "_runtime") else loan.instance._runtime
        assert isinstance(runtime.get_func("opa_eval"), wasm_fastcall._UncheckedFunc)
        assert isinstance(runtime.get_export("memory"), wasmtime.Memory)


def test_a_policy_without_the_expected_internals_is_left_alone() -> None:
    class Opaque:
        pass

    assert wasm_fastcall.accelerate(Opaque()) is False


def test_the_lean_evaluator_answers_as_opa_py_wasm(tmp_path: Path) -> None:
    """One opa_eval call per evaluation: the same decisions as opa-py-wasm's evaluate, for allowed,
    denied results, for inputs far larger than the memory the instance started with
    (the memory grows), and after a failed evaluation (the instance is rebuilt)."""
    from common import strict_json

    policy = _policy(tmp_path, False)
    lean = wasm_fastcall.LeanEvaluator(policy, "envoy/authz/result")
    try:
        big = {**DOCS[0], "parsed_body": {"model": "gpt2", "prompt": "x" * 900_000}}
        docs = [*DOCS, big, *DOCS]
        assert [lean.evaluate(strict_json.dumps(d)) for d in docs] == [policy.evaluate(d) for d in docs]
        assert lean.evaluate(strict_json.dumps(DOCS[0]))["allowed"] is True
        with pytest.raises(wasm_fastcall.LeanEvaluationError, match="max_input_bytes"):
            lean.evaluate(b"[" + b"1," * 600_000 + b"1]")
        lean._eval = None  # a broken instance: the call fails, the next evaluation takes a fresh one
        with pytest.raises(wasm_fastcall.LeanEvaluationError):
            lean.evaluate(strict_json.dumps(DOCS[1]))
        assert lean.evaluate(strict_json.dumps(DOCS[1])) == policy.evaluate(DOCS[1])
    finally:
        lean.close()
        policy.close()
