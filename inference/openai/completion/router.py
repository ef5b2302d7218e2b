"""``POST /v1/completions``: the route, one call to the serving object, and the framing of its result."""

from __future__ import annotations

from aiohttp import web

from common.routes import ROUTES
from inference.config import LimitsConfig
from inference.openai.completion.serving import OPERATION, CompletionServing
from inference.openai.http import traced_handler
from inference.tracing import Tracing

PATH = next(r.path for r in ROUTES if r.id == "completions")  # common/routes.py: the one list


def routes(serving: CompletionServing, tracing: Tracing, limits: LimitsConfig, replica_id: str) -> list[web.RouteDef]:
    return [web.post(PATH, traced_handler(OPERATION, serving.create, tracing, limits, replica_id))]
