"""The memory check's estimate (inference/models/memory.py): exact weight counts from a meta build,
made once per architecture by the registry's MemoryEstimator."""

from __future__ import annotations

from inference.config import ModelConfig
from inference.models import memory


def test_the_weight_count_is_built_once_per_architecture_and_dtype(monkeypatch) -> None:
    builds: list[str] = []
    real = memory._weight_count

    def counting(hf, dtype):
        builds.append(hf.model_type)
        return real(hf, dtype)

    monkeypatch.setattr(memory, "_weight_count", counting)
    estimator = memory.MemoryEstimator()
    v1 = ModelConfig(random_config="tiny-llama", seed=0, device="cpu")
    first = estimator.estimate(v1, slots=4)
    # another seed of the same architecture (a hot swap to new weights): no second build, same figures
    again = estimator.estimate(ModelConfig(random_config="tiny-llama", seed=1, device="cpu"), slots=4)
    assert builds == ["llama"] and again == first
    assert first == memory.estimate(v1, slots=4)  # the same as a fresh meta build
    assert first.weights_bytes > 0 and first.kv_cache_bytes > 0
    # another architecture, or the same one in another dtype, is counted on its own
    other = estimator.estimate(ModelConfig(random_config="tiny-gpt2", device="cpu"), slots=4)
    estimator.estimate(ModelConfig(random_config="tiny-llama", seed=0, device="cpu", dtype="bfloat16"), slots=4)
    assert len(builds) == 3 and other.weights_bytes != first.weights_bytes
