"""In-process policy evaluation (OPA's Wasm output) gives the OPA server's decisions."""

from __future__ import annotations

import asyncio
import json
import shutil
import string
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.processes import ROOT
from kernelgate.policy_bundle import build_wasm_bundle
from sidecar.config import OpaConfig
from sidecar.decision import DecisionCache, Decider, DecisionUnavailable
from sidecar.input import build_input
from sidecar.opa_wasm import BundleError, WasmPolicyClient
from tests import procs
from tests.e2e.test_authz_e2e import post
from tests.e2e.test_hostile_input import check_request
from tests.stack import AuthzStack, ACME_KEY

IDENTITIES = [
    {"authenticated": True, "method": "api_key", "tenant": "acme", "tier": "pro", "scopes": ["*"], "subject": None},
    {"authenticated": True, "method": "jwt", "tenant": "globex", "tier": "free", "scopes": ["completions"],
     "subject": "u1"},
    {"authenticated": True, "method": "api_key", "tenant": "initech", "tier": "free", "scopes": ["*"],
     "subject": None},
    {"authenticated": True, "method": "api_key", "tenant": "nobody", "tier": "pro", "scopes": ["*"], "subject": None},
    {"authenticated": False, "method": "anonymous", "tenant": None, "tier": None, "scopes": [], "subject": None},
]


@pytest.fixture(scope="module")
def policy_pair(tmp_path_factory):
    """The shipped policy twice: in a real OPA server, and compiled to Wasm in process."""
    work = tmp_path_factory.mktemp("wasm")
    policies = work / "policies"
    shutil.copytree(ROOT / "policies", policies, ignore=shutil.ignore_patterns("*_test.rego"))
    opa = procs.start_opa(work / "logs", policies)
    bundle = build_wasm_bundle(policies, work / "bundle.tar.gz", "envoy/authz/result")
    wasm = WasmPolicyClient(OpaConfig(mode="wasm", wasm_bundle_file=str(bundle)))
    yield f"http://127.0.0.1:{opa.ports['port']}", wasm, bundle, policies
    opa.stop()


def server_decision(url: str, document: dict) -> object:
    request = urllib.request.Request(f"{url}/v1/data/envoy/authz/result", data=json.dumps({"input": document}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp).get("result")


def document(method: str, path: str, body: str, identity: dict) -> dict:
    doc = build_input(check_request(method, path, {"content-type": "application/json"}, body)).document
    doc["identity"] = identity
    doc["kernelgate"]["estimated_tokens"] = 10
    return doc


bodies = st.one_of(
    st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["tiny-gpt2", "gpt2-medium", "opt-1.3b", "all-minilm-l6-v2", "nope", ""]),
        "prompt": st.text(max_size=20),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=10000), st.floats(), st.text(max_size=3),
                                st.none()),
        "max_completion_tokens": st.integers(min_value=-1, max_value=5000),
    }).map(json.dumps),
    st.text(alphabet=string.printable, max_size=40),
    st.just(""),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(method="POST", path="/v1/completions", body='{"model": "tiny-gpt2", "max_tokens": 257.0}', identity=IDENTITIES[1])
@example(method="POST", path="/v1/completions", body='{"model": "tiny-gpt2", "max_tokens": 1e20}', identity=IDENTITIES[1])
@example(method="POST", path="/v1/completions", body='{"model": "tiny-gpt2", "max_tokens": 1.7976931348623157e308}', identity=IDENTITIES[1])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
                             "/healthz", "/readyz", "/v1/other", "/", "/v1/completions/x"]),
       body=bodies, identity=st.sampled_from(IDENTITIES))
def test_wasm_gives_the_servers_decision(policy_pair, method, path, body, identity):
    url, wasm, _, _ = policy_pair
    doc = document(method, path, body, identity)
    assert asyncio.run(wasm.evaluate(doc)) == server_decision(url, doc)


def test_bundle_reload_changes_revision_and_decision(policy_pair, tmp_path: Path):
    _, _, bundle, policies = policy_pair
    own = tmp_path / "bundle.tar.gz"
    shutil.copyfile(bundle, own)
    client = WasmPolicyClient(OpaConfig(mode="wasm", wasm_bundle_file=str(own)))
    doc = document("POST", "/v1/completions", json.dumps({"model": "brand-new", "max_tokens": 1}), IDENTITIES[0])
    first = asyncio.run(client.revision())
    assert asyncio.run(client.evaluate(doc))["reason"] == "model_not_found"

    changed = tmp_path / "policies"
    shutil.copytree(policies, changed)
    data = json.loads((changed / "data.json").read_text())
    data["kernelgate"]["models"]["brand-new"] = {"kind": "generate"}
    (changed / "data.json").write_text(json.dumps(data))
    build_wasm_bundle(changed, own, "envoy/authz/result")
    assert asyncio.run(client.revision()) != first
    assert asyncio.run(client.evaluate(doc))["allowed"] is True

    own.write_bytes(b"not a bundle")  # a broken bundle keeps the policy in force
    revision = asyncio.run(client.revision())
    assert asyncio.run(client.evaluate(doc))["allowed"] is True
    assert revision == asyncio.run(client.revision())


async def test_a_runaway_wasm_evaluation_is_cut_off_at_the_deadline(tmp_path: Path):
    """In process, the Decider sets no asyncio timer (evaluate never yields): wasmtime's epoch
    deadline (opa.timeout_s) interrupts the evaluation, and the check fails closed as unavailable."""
    policies = tmp_path / "slow"
    policies.mkdir()
    (policies / "p.rego").write_text("package envoy.authz\n\nimport rego.v1\n\n"
                                     "result := {\"allowed\": n > 0} if {\n"
                                     "\tn := count([x | some x in numbers.range(1, input.parsed_body.n); x % 7 == 3])\n}\n")
    bundle = build_wasm_bundle(policies, tmp_path / "slow.tar.gz", "envoy/authz/result")
    config = OpaConfig(mode="wasm", wasm_bundle_file=str(bundle), timeout_s=0.2)
    client = WasmPolicyClient(config)
    decider = Decider(config, client, DecisionCache(0, 1))
    def asking(n: int) -> dict:
        return document("POST", "/v1/completions", json.dumps({"n": n}), IDENTITIES[0])

    try:
        assert client.in_process and (await decider.decide(asking(100))).allowed
        started = time.monotonic()
        with pytest.raises(DecisionUnavailable, match="time limit"):
            await decider.decide(asking(10**9))
        # ticks of timeout_s / 8 (not opa-py-wasm's 10 ms): cut off after 7/8 to 8/8 of the 0.2 s
        assert 0.2 * 7 / 8 - 0.01 <= time.monotonic() - started < 5
        assert client._bundle.policy._factory.epoch.tick_seconds == pytest.approx(0.2 / 8)
        assert client._bundle.evaluator._ticks == 8
        assert (await decider.decide(asking(50))).allowed  # the next evaluation runs normally
    finally:
        await client.close()  # stops its epoch ticker thread


def test_bad_bundles_are_refused_at_start(tmp_path: Path):
    bad = tmp_path / "b.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(BundleError, match="not a readable bundle"):
        WasmPolicyClient(OpaConfig(mode="wasm", wasm_bundle_file=str(bad)))
    with pytest.raises(ValueError, match="wasm_bundle_file"):
        OpaConfig(mode="wasm")


async def test_wasm_mode_behind_envoy_needs_no_opa_server(tmp_path: Path):
    bundle = build_wasm_bundle(ROOT / "policies", tmp_path / "bundle.tar.gz", "envoy/authz/result")
    stack = AuthzStack(tmp_path, authz_overrides={"opa": {"mode": "wasm", "wasm_bundle_file": str(bundle)}})
    try:
        stack.procs["upstream"] = procs.start("upstream", [sys.executable, "-m", "tests.echo_upstream",
                                                           str(stack.upstream_port)], stack.logs)
        stack.start_sidecar()
        stack.start_envoy()
        procs.wait_tcp(stack.upstream_port, proc=stack.procs["upstream"])
        status, _, echo = await post(stack.url, headers={"x-api-key": ACME_KEY})
        assert status == 200 and echo["headers"]["x-kernelgate-tenant"] == "acme"
        status, _, payload = await post(stack.url, body={"model": "nope", "prompt": "x"},
                                        headers={"x-api-key": ACME_KEY})
        assert (status, payload["error"]["code"]) == (404, "model_not_found")
        assert "opa" not in stack.procs
    finally:
        stack.stop()
