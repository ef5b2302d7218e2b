"""The model-lifecycle admin API: load, activate, unload, status — on its own port, never routed by Envoy.

In: the registry (behind :class:`Lifecycle`) and the bearer token. Out: an aiohttp application.
Every request needs ``Authorization: Bearer <token>``; the token is compared in constant time
(``hmac.compare_digest``) and never logged; a missing or wrong one is a 401 in OpenAI's error
shape. Routes (``ADMIN_ROUTES``, the one list; ``kernelgate models`` is their client):

- ``GET  /admin/models``                                   status of every model and version
- ``POST /admin/models/{model}/versions``                  ``{"version", "path" | "random_config", "seed", "activate",
  "faults"}`` (``faults``: ``inference.config.FaultConfig``, a drill knob):
  202, loading + validation run in the background; 404 unknown model, 409 version exists, 507 does not fit
- ``POST /admin/models/{model}/versions/{version}/activate``  409 unless the version is validated (ready)
- ``DELETE /admin/models/{model}/versions/{version}``      unload a version that is not active
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from inference.config import AdminConfig, FaultConfig, VersionConfig
from inference.models.errors import LifecycleError

log = logging.getLogger("kernelgate.inference.admin")

ADMIN_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/admin/models"),
    ("POST", "/admin/models/{model}/versions"),
    ("POST", "/admin/models/{model}/versions/{version}/activate"),
    ("DELETE", "/admin/models/{model}/versions/{version}"),
)


class Lifecycle(Protocol):
    async def load(self, model: str, version: VersionConfig, activate: bool = False) -> Any: ...

    def activate(self, model: str, version: str) -> Any: ...

    def unload(self, model: str, version: str) -> Any: ...

    def status(self) -> dict[str, Any]: ...


def read_token(config: AdminConfig, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from ``token_file``, else from the ``token_env`` variable; None when neither is set."""
    if config.token_file:
        token = Path(config.token_file).read_text(encoding="utf-8").strip()
    else:
        token = (environ if environ is not None else os.environ).get(config.token_env, "").strip()
    return token or None


def _error(status: int, message: str, code: str, param: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


def create_admin_app(registry: Lifecycle, token: str) -> web.Application:
    expected = token.encode()

    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return _error(401, "missing or invalid admin bearer token", "unauthorized",
                          **{"WWW-Authenticate": 'Bearer realm="kernelgate-admin"'})
        try:
            return await handler(request)
        except LifecycleError as exc:
            return _error(exc.status, str(exc), exc.code)
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason or "HTTP error", "not_found" if exc.status == 404 else "http_error")

    async def status(_: web.Request) -> web.Response:
        return web.json_response(registry.status())

    async def load(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return _error(400, "body is not valid JSON", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("version"), str) or not body["version"]:
            return _error(400, "body must be an object with a non-empty string 'version'", "invalid_value", "version")
        unknown = set(body) - {"version", "path", "random_config", "seed", "activate", "faults"}
        if unknown:
            return _error(400, f"unknown field '{sorted(unknown)[0]}'", "invalid_value", sorted(unknown)[0])
        faults = body.get("faults", {})
        if not isinstance(faults, dict) or set(faults) - {"error_rate", "first_token_delay_ms"}:
            return _error(400, "faults must be an object with error_rate and/or first_token_delay_ms",
                          "invalid_value", "faults")
        try:
            version = VersionConfig(version=body["version"], path=body.get("path"),
                                    random_config=str(body.get("random_config", "tiny-gpt2")),
                                    seed=int(body.get("seed", 0)),
                                    faults=FaultConfig(**{k: float(v) for k, v in faults.items()}))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc), "invalid_value")
        model = request.match_info["model"]
        entry = await registry.load(model, version, activate=bool(body.get("activate", False)))
        log.info("admin: loading version %s of model %s from %s", version.version, model, entry.source)
        return web.json_response(entry.describe(), status=202)

    async def activate(request: web.Request) -> web.Response:
        entry = registry.activate(request.match_info["model"], request.match_info["version"])
        return web.json_response(entry.describe())

    async def unload(request: web.Request) -> web.Response:
        entry = registry.unload(request.match_info["model"], request.match_info["version"])
        return web.json_response(entry.describe())

    handlers = {"/admin/models": status, "/admin/models/{model}/versions": load,
                "/admin/models/{model}/versions/{version}/activate": activate,
                "/admin/models/{model}/versions/{version}": unload}
    app = web.Application(middlewares=[authenticate], client_max_size=64 * 1024)
    for method, path in ADMIN_ROUTES:
        app.router.add_route(method, path, handlers[path])
    return app
