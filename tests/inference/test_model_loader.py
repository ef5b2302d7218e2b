"""Model loading: local HF directories, named random configs, and the DeepSpeed fallback."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inference.attention import SlotAttention, install_in_hf_model
from inference.config import ModelConfig
from inference.model_loader import load_model, with_deepspeed
from tests.inference.helpers import TINY, generate, started_engine, tiny_config


def test_random_weights_are_seeded() -> None:
    a = load_model(TINY).module.state_dict()
    b = load_model(TINY).module.state_dict()
    c = load_model(replace(TINY, seed=1)).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_random_weights_depend_on_the_seed_alone_not_on_other_threads() -> None:
    """#15: versions load on their own engine threads, beside each other and beside serving ones.
    A version with the same config and seed as another must get the same weights even while other
    builds run and other threads seed and draw from torch's global generator (a global
    ``manual_seed`` + init let them in between: the shadow run then refused a version with the
    active version's own weights)."""
    sharp = replace(TINY, random_config="tiny-gpt2-sharp")
    alone = load_model(sharp).module.state_dict()
    stop = threading.Event()

    def draw_from_the_global_generator() -> None:
        while not stop.is_set():
            torch.manual_seed(1234)
            torch.rand(256)

    built: dict[str, dict[str, torch.Tensor]] = {}

    def build(key: str, config: ModelConfig) -> None:
        built[key] = load_model(config).module.state_dict()

    threads = [threading.Thread(target=draw_from_the_global_generator)]
    threads += [threading.Thread(target=build, args=(f"same{i}", sharp)) for i in range(3)]
    threads += [threading.Thread(target=build, args=("other", replace(TINY, random_config="tiny-llama", seed=1)))]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert set(built) == {"same0", "same1", "same2", "other"}
    for i in range(3):
        weights = built[f"same{i}"]
        assert weights.keys() == alone.keys()
        assert [k for k in alone if not torch.equal(weights[k], alone[k])] == []


def test_unknown_random_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown random_config 'nope'.*tiny-gpt2"):
        load_model(replace(TINY, random_config="nope"))


async def test_serves_a_local_hf_directory(tmp_path: Path) -> None:
    """Save the tiny model and demo tokenizer with save_pretrained (safetensors) and serve that directory."""
    source = load_model(TINY)
    source.module.config._attn_implementation = "sdpa"
    source.module.save_pretrained(tmp_path, safe_serialization=True)
    source.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    from_dir = started_engine(tiny_config(model=ModelConfig(name="local", path=str(tmp_path), device="cpu",
                                                            use_deepspeed=False)))
    from_config = started_engine(tiny_config())
    try:
        prompt = list(b"local weights")
        assert (await generate(from_dir, prompt, 12)).token_ids == (await generate(from_config, prompt, 12)).token_ids
        assert from_dir.info.tokenizer.chat_template
    finally:
        from_dir.shutdown(10)
        from_config.shutdown(10)


def _plain(config: ModelConfig) -> tuple[torch.nn.Module, SlotAttention]:
    module = load_model(config).module
    attention = SlotAttention()
    install_in_hf_model(module, attention)
    return module, attention


def test_deepspeed_failure_falls_back_to_plain_path(caplog: pytest.LogCaptureFixture) -> None:
    def failing_inject(*_: object) -> torch.nn.Module:
        raise AttributeError("'tuple' object has no attribute 'size'")

    module, attention = _plain(TINY)
    with caplog.at_level(logging.WARNING, logger="kernelgate.inference.model"):
        served, backend = with_deepspeed(TINY, module, attention, torch.device("cpu"), torch.float32, 512, 4,
                                         inject=failing_inject)
    assert backend == "hf"
    assert "falling back to the plain Hugging Face path" in caplog.text and "'tuple'" in caplog.text
    assert served is not module


def test_injected_model_that_disagrees_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    def wrong_inject(_config: object, module: torch.nn.Module, *_: object) -> torch.nn.Module:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        return module

    module, attention = _plain(TINY)
    with caplog.at_level(logging.WARNING, logger="kernelgate.inference.model"):
        _, backend = with_deepspeed(TINY, module, attention, torch.device("cpu"), torch.float32, 512, 4,
                                    inject=wrong_inject)
    assert backend == "hf" and "disagrees with the plain model" in caplog.text


def test_matching_injection_is_used() -> None:
    module, attention = _plain(TINY)
    served, backend = with_deepspeed(TINY, module, attention, torch.device("cpu"), torch.float32, 512, 4,
                                     inject=lambda _c, m, *_: m)
    assert backend == "deepspeed" and served is module


def test_deepspeed_is_skipped_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kernelgate.inference.model"):
        loaded = load_model(replace(TINY, use_deepspeed=True))
    assert loaded.backend == "hf" and "needs CUDA" in caplog.text


def test_injection_probe_runs_first_at_full_batch_width() -> None:
    """DeepSpeed sizes its workspace on the first forward: that forward must be the widest batch."""
    widths: list[int] = []

    def recording_inject(_config: object, module: torch.nn.Module, *_: object) -> torch.nn.Module:
        module.base_model.register_forward_pre_hook(lambda _m, _a, kwargs: widths.append(kwargs["input_ids"].shape[0]),
                                                    with_kwargs=True)
        return module

    module, attention = _plain(TINY)
    with_deepspeed(TINY, module, attention, torch.device("cpu"), torch.float32, 512, 6, inject=recording_inject)
    assert widths and widths[0] == 6 and max(widths) == 6
