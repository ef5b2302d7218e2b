"""``POST /v1/embeddings``: the route, one call to the serving object, and the framing of its result."""

from __future__ import annotations

from aiohttp import web

from inference.config import LimitsConfig
from inference.openai.embeddings.serving import EmbeddingServing
from inference.openai.http import traced_handler
from inference.tracing import Tracing

PATH = "/v1/embeddings"


def routes(serving: EmbeddingServing, tracing: Tracing, limits: LimitsConfig) -> list[web.RouteDef]:
    return [web.post(PATH, traced_handler("embeddings", serving.create, tracing, limits))]
