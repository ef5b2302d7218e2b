"""``/v1/embeddings`` with the packaged all-MiniLM-L6-v2 encoder (installed by scripts/setup.sh)."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import replace

import aiohttp

from inference.config import EmbeddingsConfig
from tests.inference.helpers import tiny_config, wait_until

# scripts/setup.sh installs the encoder: its absence is a failure, not a reason to skip.

ENCODER = "all-minilm-l6-v2"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


async def test_embeddings_endpoint(serve, shared_engine) -> None:
    config = tiny_config(embeddings=replace(EmbeddingsConfig(), enabled=True, device="cpu"))
    served = await serve(config, engine=shared_engine)
    await wait_until(lambda: served.state.encoder.ready, timeout=60)
    url = f"{served.url}/v1/embeddings"
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue grew by 4 percent."]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.url}/readyz") as resp:
            assert resp.status == 200
        async with s.get(f"{served.url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-gpt2", ENCODER]
        async with s.post(url, json={"model": ENCODER, "input": texts}) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with s.post(url, json={"model": ENCODER, "input": texts[0], "encoding_format": "base64"}) as resp:
            packed = (await resp.json())["data"][0]["embedding"]
        async with s.post(url, json={"model": ENCODER, "input": []}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "input"
        async with s.post(url, json={"model": "other-encoder", "input": "x"}) as resp:
            assert resp.status == 404
        async with s.post(f"{served.url}/v1/completions", json={"model": ENCODER, "prompt": "x"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["object"] == "list"
    assert all(len(v) == 384 and math.isclose(math.sqrt(cosine(v, v)), 1.0, rel_tol=1e-4) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert body["usage"]["prompt_tokens"] > len(texts)
    decoded = struct.unpack(f"<{384}f", base64.b64decode(packed))
    assert max(abs(a - b) for a, b in zip(decoded, vectors[0])) < 1e-5
