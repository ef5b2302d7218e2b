"""OPA-Envoy's own example policies, unchanged, give the same decisions through kernelgate.

The policies come from the rival's source snapshot (``../shared/rivals/opa-envoy-plugin-*.tar.gz``:
``examples/``), among them the quick start's, which verifies JWTs itself with
``io.jwt.decode_verify`` and reads ``input.attributes.request.http.headers.authorization``.
Each runs in OPA-Envoy (the real binary, built by ``../shared/rivals/build.sh``) behind one Envoy
and in kernelgate (``identity.enabled: false``, ``opa.policy_path: envoy/authz/allow``) behind
another, over both of kernelgate's transports; the same requests must get the same statuses.
"""

from __future__ import annotations

import base64
import re
import tarfile
import time
from pathlib import Path

import jwt
import pytest
import yaml

from kernelgate.envoy_config import EnvoyConfig, render
from tests import procs
from tests.e2e.test_authz_e2e import post
from tests.stack import AuthzStack

RIVALS = procs.ROOT.parent / "shared" / "rivals"
if not RIVALS.is_dir():
    RIVALS = Path("/work/shared/rivals")
BINARY = Path.home() / ".cache/kernelgate/bin/opa-envoy-plugin"


def example_policies() -> dict[str, str]:
    """``{example name: Rego}`` from the rival's source snapshot (README code blocks and manifests)."""
    tarballs = sorted(RIVALS.glob("opa-envoy-plugin-*.tar.gz"))
    if not tarballs:
        return {}
    found: dict[str, str] = {}
    with tarfile.open(tarballs[-1]) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if "examples" not in parts or not member.isfile() or not member.name.endswith((".rego", ".md", ".yaml")):
                continue
            text = tar.extractfile(member).read().decode()
            example = parts[parts.index("examples") + 1]
            if member.name.endswith(".rego"):
                blocks = [text]
            elif member.name.endswith(".md"):
                blocks = re.findall(r"```rego\n(.*?)```", text, re.S)
            elif member.name.endswith(".yaml"):
                blocks = [doc["data"]["policy.rego"] for doc in yaml.safe_load_all(text)
                          if isinstance(doc, dict) and isinstance(doc.get("data"), dict)
                          and "policy.rego" in doc["data"]]
            else:
                continue
            for block in blocks:
                if "package envoy.authz" in block and block not in found.values():
                    found[f"{example}-{len(found)}"] = block
    return found


POLICIES = example_policies()
pytestmark = [
    pytest.mark.skipif(not BINARY.exists(), reason="OPA-Envoy is not built (../shared/rivals/build.sh, or "
                                                   "KERNELGATE_BUILD_RIVALS=1 scripts/setup.sh)"),
    pytest.mark.skipif(not POLICIES, reason=f"no OPA-Envoy source snapshot under {RIVALS}"),
]


def token(secret: str = "secret", **claims) -> str:
    now = int(time.time())
    return jwt.encode({"nbf": now - 10, "exp": now + 300, **claims}, secret, algorithm="HS256")


ALICE = base64.urlsafe_b64encode(b"alice").decode().rstrip("=")
KITCHEN_SINK = {"neededNumA": 1.23, "neededNumB": 1.23, "opaqueId": "asdf",
                "person": {"id": "123", "name": "alice", "parent": {"id": "122", "name": "bob"}},
                "state": "AWAITING_INPUT"}


def cases() -> list[tuple[str, str, dict, object]]:
    """(method, path, headers, body): allowed and denied for every example policy."""
    guest, admin = token(role="guest", sub=ALICE), token(role="admin", sub=ALICE)
    expired = token(role="admin", sub=ALICE, exp=int(time.time()) - 60)
    forged = token(secret="not-the-secret", role="admin", sub=ALICE)
    out = []
    for auth in (None, guest, admin, expired, forged, "garbage"):
        headers = {"authorization": f"Bearer {auth}"} if auth else {}
        out += [("GET", "/people", headers, None), ("GET", "/people/7", headers, None),
                ("GET", "/other", headers, None), ("POST", "/people", headers, {"firstname": "Charlie"}),
                ("POST", "/people", headers, {"firstname": "Alice"}), ("DELETE", "/people", headers, None)]
    out += [("POST", "/test.KitchenSink/Ping", {}, {}), ("POST", "/test.KitchenSink/Exchange", {}, KITCHEN_SINK),
            ("POST", "/test.KitchenSink/Exchange", {}, {**KITCHEN_SINK, "opaqueId": "other"})]
    return out


def start_opa_envoy(workdir: Path, policy: Path, upstream_port: int) -> tuple[list[procs.Proc], str]:
    grpc_port, port, admin = procs.free_port(), procs.free_port(), procs.free_port()
    rival = procs.start("opa-envoy", [str(BINARY), "run", "--server", "--addr", f"127.0.0.1:{procs.free_port()}",
                                      "--log-level", "error",
                                      "--set", f"plugins.envoy_ext_authz_grpc.addr=127.0.0.1:{grpc_port}",
                                      "--set", "plugins.envoy_ext_authz_grpc.path=envoy/authz/allow",
                                      "--set", "decision_logs.console=false", str(policy)], workdir / "logs")
    procs.wait_tcp(grpc_port, proc=rival)
    bootstrap = workdir / "rival-envoy.yaml"
    bootstrap.write_text(yaml.safe_dump(render(EnvoyConfig(
        listen_port=port, admin_port=admin, authz_address=f"127.0.0.1:{grpc_port}",
        upstream_address=f"127.0.0.1:{upstream_port}"))))
    envoy = procs.start("rival-envoy", [procs.find_binary("envoy"), "-c", str(bootstrap), "--use-dynamic-base-id",
                                        "--log-level", "warn", "--concurrency", "1"], workdir / "logs")
    procs.wait_http(f"http://127.0.0.1:{admin}/ready", proc=envoy)
    return [rival, envoy], f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("example", sorted(POLICIES))
async def test_opa_envoy_examples_decide_the_same_in_kernelgate(example: str, tmp_path: Path, transport: str) -> None:
    stack = AuthzStack(tmp_path, transport=transport, authz_overrides={
        "identity": {"enabled": False},
        "opa": {"policy_path": "envoy/authz/allow", "revision_paths": [], "cache_ttl_s": 0.5}})
    for old in stack.policy_dir.iterdir():
        old.unlink()
    policy = stack.policy_dir / "policy.rego"
    policy.write_text(POLICIES[example])
    rival_procs: list[procs.Proc] = []
    try:
        stack.start()
        rival_procs, rival_url = start_opa_envoy(tmp_path, policy, stack.upstream_port)
        ours, theirs = [], []
        for method, path, headers, body in cases():
            ours.append((await post(stack.url, body=body, headers=headers, path=path, method=method))[0])
            theirs.append((await post(rival_url, body=body, headers=headers, path=path, method=method))[0])
        assert ours == theirs, [(c[:2], o, t) for c, o, t in zip(cases(), ours, theirs) if o != t]
        assert {200, 403} <= set(theirs), f"the cases must reach both an allow and a deny: {theirs}"
    finally:
        for proc in reversed(rival_procs):
            proc.stop()
        stack.stop()


def test_the_quick_start_policy_verifies_jwts_itself() -> None:
    """The compatibility claim covers a policy that checks signatures itself, not only header rules."""
    assert any("io.jwt.decode_verify" in p and "headers.authorization" in p for p in POLICIES.values()), \
        sorted(POLICIES)
