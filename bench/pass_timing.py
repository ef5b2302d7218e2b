"""The forward passes the CUPTI diagnostics time, built as the server builds them.

``load_model`` + ``ModelRunner`` (random-weight model, HF backend, CUDA graphs for decode), then
three passes with their host sync, as the engine runs them: a batch-``batch`` decode step replayed
from a CUDA graph, the same step eager, and a batch-1 eager prefill of ``prompt_tokens`` tokens.
Used by bench/cupti_after_capture.py and bench/cupti_direct.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class PassTimer:
    runner: Any
    graphs: int
    graph_step: Callable[[], None]
    eager_step: Callable[[], None]
    prefill: Callable[[], None]
    sync: Callable[[], None]
    decode_steps: int = 60  # per timing chunk; a round is the median of 5
    prefills: int = 10  # per timing chunk; a round is the median of 3

    @classmethod
    def build(cls, model_name: str, device: str, batch: int, prompt_tokens: int, **chunks: int) -> PassTimer:
        """Call inside ``torch.inference_mode()``."""
        import torch

        from inference.config import ModelConfig
        from inference.model_loader import load_model
        from inference.runner import ModelRunner

        cuda = device == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        model = load_model(ModelConfig(name=model_name, random_config=model_name, device=device,
                                       use_deepspeed=False, max_model_len=512), batch)
        runner = ModelRunner(model.module, model.attention, num_slots=batch, max_len=model.max_model_len,
                             dtype=model.dtype, device=model.device, use_cuda_graphs=cuda)
        runner.prefill(0, [[1, 2, 3, 4]] * batch)
        runner.decode([5] * batch, [4] * batch)
        sync()
        graphs = runner.capture_decode_graphs()
        prompt = [(7 * i) % min(model.module.config.vocab_size, 50000) for i in range(prompt_tokens)]
        positions = [prompt_tokens + 20] * batch
        tokens = [11] * batch
        eager_tokens = torch.full((batch, 1), 11, dtype=torch.long, device=model.device)
        eager_positions = torch.full((batch, 1), positions[0], dtype=torch.long, device=model.device)
        kv_len = 256 if model.max_model_len >= 256 else model.max_model_len

        def graph_step() -> None:
            runner.decode(tokens, positions).argmax(-1).tolist()

        def eager_step() -> None:
            runner._decode_logits(eager_tokens, eager_positions, kv_len).argmax(-1).tolist()  # noqa: SLF001

        def prefill() -> None:
            runner.prefill(batch - 1, [prompt]).argmax(-1).tolist()

        timer = cls(runner, graphs, graph_step, eager_step, prefill, sync, **chunks)
        for fn in (graph_step, eager_step, prefill):
            timer.rate(fn, 5)
        return timer

    def rate(self, fn: Callable[[], None], n: int) -> float:
        """ms per call of ``fn``, over ``n`` calls."""
        self.sync()
        began = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return round((time.perf_counter() - began) * 1e3 / n, 4)

    def bench(self) -> dict[str, float]:
        return {"graph_decode_ms": statistics.median(self.rate(self.graph_step, self.decode_steps) for _ in range(5)),
                "eager_prefill_ms": statistics.median(self.rate(self.prefill, self.prefills) for _ in range(3))}
