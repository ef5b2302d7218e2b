"""Config loading (YAML + env overrides, typed, bad keys named) and the generated Envoy bootstrap."""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path

import pytest
import yaml

from common.processes import ROOT, find_binary
from common.settings import ConfigError, apply_env_overrides, build
from kernelgate.envoy_config import EnvoyConfig, render
from sidecar.config import SidecarConfig


def test_build_fills_nested_dataclasses_and_names_bad_keys():
    cfg = build(SidecarConfig, {"listen": "127.0.0.1:1", "opa": {"timeout_s": 1, "failure_mode": "allow"},
                                "ratelimit": {"rules": [{"tenant": "a", "requests": 5}]}})
    assert cfg.opa.timeout_s == 1.0 and cfg.opa.failure_mode == "allow"
    assert cfg.ratelimit.rules[0].requests == 5 and cfg.ratelimit.rules[0].unit == "minute"
    with pytest.raises(ConfigError, match=r"'opa.timout_s': unknown key"):
        build(SidecarConfig, {"opa": {"timout_s": 1}})
    with pytest.raises(ConfigError, match=r"'opa.failure_mode': must be one of 'deny', 'allow'"):
        build(SidecarConfig, {"opa": {"failure_mode": "maybe"}})
    with pytest.raises(ConfigError, match=r"'ratelimit.rules\[0\].requests': expected an integer"):
        build(SidecarConfig, {"ratelimit": {"rules": [{"requests": "lots"}]}})
    with pytest.raises(ConfigError, match=r"'drain_s': expected a number"):
        build(SidecarConfig, {"drain_s": True})


def test_env_overrides_win_over_the_file():
    data = apply_env_overrides({"authz": {"opa": {"timeout_s": 1}}},
                               {"KERNELGATE__AUTHZ__OPA__TIMEOUT_S": "0.25", "KERNELGATE__AUTHZ__SHADOWX": "x",
                                "OTHER": "1"})
    assert data["authz"]["opa"]["timeout_s"] == 0.25
    with pytest.raises(ConfigError, match="'shadowx'"):
        build(SidecarConfig, data["authz"])


def test_cli_rejects_a_bad_config_with_the_key_path(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"authz": {"opa": {"urll": "x"}}}))
    proc = subprocess.run([sys.executable, "-m", "kernelgate.cli", "validate-config", "-c", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "authz.opa.urll" in proc.stderr and "unknown key" in proc.stderr


def test_shipped_config_is_valid():
    proc = subprocess.run([sys.executable, "-m", "kernelgate.cli", "validate-config", "-c",
                           str(ROOT / "config/kernelgate.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("cfg", [
    EnvoyConfig(),
    EnvoyConfig(otlp_address="127.0.0.1:4317", authz_address="unix:/tmp/kg.sock"),
    EnvoyConfig(upstream_address="inference.default.svc:8000", otlp_address="jaeger-collector:4317"),
])
def test_envoy_bootstrap_passes_envoy_validate(tmp_path: Path, cfg: EnvoyConfig):
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(render(cfg)))
    proc = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_envoy_bootstrap_guards_the_upstream():
    hcm = render(EnvoyConfig())["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    authz = hcm["httpFilters"][0]["typedConfig"]
    assert hcm["httpFilters"][0]["name"] == "envoy.filters.http.ext_authz"
    assert not authz.get("failureModeAllow", False)
    assert authz["statusOnError"]["code"] == "ServiceUnavailable"
    assert authz["withRequestBody"]["allowPartialMessage"] is True
    assert hcm["normalizePath"] is True and hcm["mergeSlashes"] is True
    assert hcm["pathWithEscapedSlashesAction"] == "REJECT_REQUEST"


def test_relative_files_are_relative_to_the_config_file_and_nothing_else(tmp_path: Path):
    from kernelgate.config import load

    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "k.yaml"
    path.write_text(yaml.safe_dump({"authz": {"identity": {"api_keys_file": "keys.yaml"},
                                              "opa": {"policy_path": "envoy/authz/result"}},
                                    "stack": {"policies_dir": "../policies"}}))
    cfg = load(path, environ={})
    assert cfg.authz.identity.api_keys_file == str(tmp_path / "conf" / "keys.yaml")
    assert cfg.stack.policies_dir == str(tmp_path / "policies")
    assert cfg.authz.opa.policy_path == "envoy/authz/result"
