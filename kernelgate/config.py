"""The one place configuration is loaded: YAML file + KERNELGATE__* environment overrides.

Each section is a component's own typed dataclass; a bad key fails here, at start,
with its dotted path in the message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kernelgate.envoy_config import EnvoyConfig
from kernelgate.settings import ConfigError, apply_env_overrides, build, load_file
from sidecar.config import SidecarConfig

PATH_SUFFIXES = ("_file", "_dir")


@dataclass(frozen=True)
class StackConfig:
    """What ``kernelgate up`` starts besides the configured servers."""

    policies_dir: str = "policies"
    opa_binary: str = "opa"
    start_inference: bool = True
    start_jaeger: bool = True
    jaeger_otlp_port: int = 4317
    jaeger_ui_port: int = 16686


@dataclass(frozen=True)
class KernelgateConfig:
    authz: SidecarConfig = field(default_factory=SidecarConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    # Built into inference.config.InferenceConfig (and validated) by load(), kept as the typed object.
    inference: Any = None
    telemetry: Any = None


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> KernelgateConfig:
    raw = load_file(path)
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    # absolute(), not resolve(): a ConfigMap mount is a symlink into a dated folder the
    # kubelet replaces on update; files beside the config must be found by the stable name.
    base = Path(path).absolute().parent if path else Path.cwd()
    raw = _resolve_paths(raw, base)
    inference_raw = raw.pop("inference", None)
    telemetry_raw = raw.pop("telemetry", None)
    config = build(KernelgateConfig, raw)
    config = _replica_targets_from_envoy(config)
    return replace(config, inference=_build_inference(inference_raw), telemetry=_build_telemetry(telemetry_raw))


def _replica_targets_from_envoy(config: KernelgateConfig) -> KernelgateConfig:
    """The sidecar polls the replicas Envoy routes to unless ``authz.replicas.targets`` says otherwise."""
    if config.authz.replicas.targets is not None:
        return config
    replicas = replace(config.authz.replicas, targets=config.envoy.all_replicas())
    return replace(config, authz=replace(config.authz, replicas=replicas))


def _build_inference(raw: Any) -> Any:
    # Imported here: the authz sidecar must start without torch installed.
    from inference.config import InferenceConfig

    return build(InferenceConfig, raw, "inference")


def _build_telemetry(raw: Any) -> Any:
    from otel.config import TelemetryConfig

    return build(TelemetryConfig, raw, "telemetry")


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
