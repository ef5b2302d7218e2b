"""``POST /v1/embeddings``: the route, one call to the serving object, and the framing of its result."""

from __future__ import annotations

from aiohttp import web

from common.routes import ROUTES
from inference.config import LimitsConfig
from inference.openai.embeddings.serving import EmbeddingServing
from inference.openai.http import traced_handler
from inference.tracing import Tracing

PATH = next(r.path for r in ROUTES if r.id == "embeddings")  # common/routes.py: the one list


def routes(serving: EmbeddingServing, tracing: Tracing, limits: LimitsConfig, replica_id: str) -> list[web.RouteDef]:
    return [web.post(PATH, traced_handler("embeddings", serving.create, tracing, limits, replica_id))]
