"""A tiny upstream for the sidecar tests: echoes what reached it, counts requests.

Run as ``python -m tests.echo_upstream PORT``. ``GET /__count`` returns how many
requests it served (the tests prove nothing passed Envoy without an allow); Envoy's
health checks are answered but not counted.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


def build_app() -> web.Application:
    served = {"count": 0}

    async def echo(request: web.Request) -> web.Response:
        if request.path == "/__count":
            return web.json_response(served)
        if request.headers.get("user-agent") != "Envoy/HC":  # Envoy's active health checks are not traffic
            served["count"] += 1
        body = await request.read()
        if "sleep" in request.query:  # a slow upstream, for drain tests
            await asyncio.sleep(float(request.query["sleep"]))
        return web.json_response({
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": len(body),
        })

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


if __name__ == "__main__":
    web.run_app(build_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
