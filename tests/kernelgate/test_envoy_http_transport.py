"""The Envoy bootstrap for the HTTP ext_authz transport: what Envoy adds to each authorization
request (sidecar/http_transport.py's carried attributes) and what a client cannot send itself."""

from __future__ import annotations

from pathlib import Path

from common.settings import build
from kernelgate.envoy_config import EnvoyConfig, render
from sidecar import http_contract, http_transport
from tests.certs import issue, make_ca
from tests.procs import envoy_validate


def http_service(envoy: dict) -> dict:
    bootstrap = render(build(EnvoyConfig, {"authz_transport": "http", **envoy}, "envoy"))
    hcm = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    ext_authz = next(f for f in hcm["httpFilters"] if f["name"] == "envoy.filters.http.ext_authz")
    return ext_authz["typedConfig"]["httpService"]


def added(service: dict) -> dict[str, str]:
    return {h["key"]: h["value"] for h in service["authorizationRequest"]["headersToAdd"]}


def test_tls_attributes_are_carried_only_when_envoy_terminates_tls() -> None:
    assert added(http_service({})) == http_contract.CARRIED
    tls = {"tls_cert_file": "/c.crt", "tls_key_file": "/c.key"}
    assert added(http_service(tls)) == {**http_contract.CARRIED, **http_contract.CARRIED_TLS}
    assert "x-kernelgate-authz-source-certificate" not in added(http_service(tls))
    mutual = added(http_service({**tls, "tls_client_ca_file": "/ca.crt"}))
    assert mutual["x-kernelgate-authz-source-certificate"] == "%DOWNSTREAM_PEER_CERT%"
    assert mutual["x-kernelgate-authz-source-uri-san"] == "%DOWNSTREAM_PEER_URI_SAN%"


def test_client_headers_pass_except_the_carried_attributes_names() -> None:
    for transport in ("grpc", "http"):
        bootstrap = render(build(EnvoyConfig, {"authz_transport": transport}, "envoy"))
        hcm = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
        ext_authz = next(f for f in hcm["httpFilters"] if f["name"] == "envoy.filters.http.ext_authz")["typedConfig"]
        assert ext_authz["allowedHeaders"]["patterns"] == [{"safeRegex": {"regex": ".*"}}]
        assert ext_authz["disallowedHeaders"]["patterns"] == [{"prefix": http_contract.CARRIED_PREFIX}]
        assert all(name.startswith(http_contract.CARRIED_PREFIX) for name in http_contract.CARRIED_NAMES)


def test_envoy_accepts_the_http_transport_with_mutual_tls(tmp_path: Path) -> None:
    ca = make_ca()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = issue(ca, "envoy", server=True).write(tmp_path, "envoy")
    cfg = build(EnvoyConfig, {"authz_transport": "http", "tls_cert_file": str(cert), "tls_key_file": str(key),
                              "tls_client_ca_file": str(tmp_path / "ca.crt")}, "envoy")
    out = envoy_validate(render(cfg), tmp_path / "envoy.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
