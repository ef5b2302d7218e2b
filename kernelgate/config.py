"""The one place configuration is loaded: YAML file + KERNELGATE__* environment overrides.

In: a YAML path (or None) and the environment. Out: a frozen ``KernelgateConfig`` whose
sections are the components' own typed dataclasses (``authz``: ``sidecar.config``,
``inference``: ``inference.config``, ``telemetry``: ``otel.config``, ``envoy``:
``kernelgate.envoy_config``, ``stack``: below). Each process (``kernelgate authz``,
``kernelgate serve``, ``kernelgate up``) takes its section from here; a bad key fails here,
at start, with its dotted path in the message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Section modules are plain dataclasses: importing inference.config loads no torch, so the
# authz sidecar starts without it (tests/test_architecture.py checks).
from common.ports import JAEGER_UI_PORT, OTLP_GRPC_PORT
from common.settings import ConfigError, apply_env_overrides, build, load_file
from inference.config import InferenceConfig
from kernelgate.envoy_config import EnvoyConfig
from otel.config import TelemetryConfig
from sidecar.config import SidecarConfig

PATH_SUFFIXES = ("_file", "_dir")


@dataclass(frozen=True)
class StackConfig:
    """What ``kernelgate up`` starts besides the configured servers."""

    policies_dir: str = "policies"
    opa_binary: str = "opa"
    start_inference: bool = True
    start_jaeger: bool = True
    jaeger_otlp_port: int = OTLP_GRPC_PORT
    jaeger_ui_port: int = JAEGER_UI_PORT


@dataclass(frozen=True)
class KernelgateConfig:
    authz: SidecarConfig = field(default_factory=SidecarConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        if self.envoy.authz_enabled and self.envoy.authz_transport == "http" and not self.authz.http_listen:
            raise ValueError("envoy.authz_transport 'http' needs authz.http_listen (the sidecar's HTTP ext_authz "
                             "address; envoy.authz_address must point at it)")


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> KernelgateConfig:
    raw = load_file(path)
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    # absolute(), not resolve(): a ConfigMap mount is a symlink into a dated folder the
    # kubelet replaces on update; files beside the config must be found by the stable name.
    base = Path(path).absolute().parent if path else Path.cwd()
    raw = _resolve_paths(raw, base)
    return _replica_targets_from_envoy(build(KernelgateConfig, raw))


def _replica_targets_from_envoy(config: KernelgateConfig) -> KernelgateConfig:
    """The sidecar polls the replicas Envoy routes to unless ``authz.replicas.targets`` says otherwise."""
    if config.authz.replicas.targets is not None:
        return config
    replicas = replace(config.authz.replicas, targets=config.envoy.all_replicas())
    return replace(config, authz=replace(config.authz, replicas=replicas))


def _resolve_paths(data: Any, base: Path) -> Any:
    """Relative ``*_file`` / ``*_dir`` values are relative to the config file."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if isinstance(value, str) and str(key).endswith(PATH_SUFFIXES) and value and value != "-" \
                    and not os.path.isabs(value):
                out[key] = os.path.normpath(base / value)
            else:
                out[key] = _resolve_paths(value, base)
        return out
    if isinstance(data, list):
        return [_resolve_paths(v, base) for v in data]
    return data


__all__ = ["ConfigError", "KernelgateConfig", "StackConfig", "load"]
