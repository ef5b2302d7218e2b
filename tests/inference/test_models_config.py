"""The ``inference.models`` / ``admin`` / ``validation`` config: strict, with the bad key's dotted path."""

from __future__ import annotations

import pytest

from common.settings import ConfigError, build
from inference.config import InferenceConfig


def test_models_section_builds_and_defaults_to_the_model_section() -> None:
    config = build(InferenceConfig, {"models": [
        {"name": "chat", "versions": [{"version": "v1", "random_config": "tiny-llama"}, {"version": "v2", "seed": 3}],
         "active": "v2", "batching": {"max_batch_size": 2}}]}, "inference")
    [chat] = config.served_models
    assert chat.active_version == "v2" and chat.batching.max_batch_size == 2
    assert config.model_config_of("chat", chat.versions[1]).seed == 3
    [single] = build(InferenceConfig, {"model": {"name": "m", "random_config": "tiny-opt"}}, "inference").served_models
    assert (single.name, single.versions[0].version, single.versions[0].random_config) == ("m", "v1", "tiny-opt")


@pytest.mark.parametrize("data, where, words", [
    ({"models": [{"name": "a", "versions": [{"vresion": "v1"}]}]}, "inference.models[0].versions[0].vresion",
     "unknown key"),
    ({"models": [{"name": "a", "versions": []}]}, "inference.models[0]", "at least one version"),
    ({"models": [{"name": "a", "versions": [{"version": "v1"}], "active": "v9"}]}, "inference.models[0]",
     "not one of"),
    ({"models": [{"name": "a", "versions": [{"version": "v1"}]}, {"name": "a", "versions": [{"version": "v1"}]}]},
     "inference", "twice"),
    ({"validation": {"min_agreement": 2}}, "inference.validation", "0..1"),
    ({"admin": {"port": 70000}}, "inference.admin", "admin.port"),
])
def test_bad_models_config_names_the_key(data: dict, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(InferenceConfig, data, "inference")
    assert err.value.key == where and words in str(err.value)
