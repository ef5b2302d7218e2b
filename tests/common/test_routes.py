"""``common/routes.py`` is the one list of routes: the policy, the inference server and k8s agree with it."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from common.routes import LOCAL_ROUTES, MODEL_PATHS, ROUTES, Route
from tests.procs import ROOT, find_binary


def test_the_policy_route_table_is_the_route_list():
    """policies/authz.rego's ``_routes`` equals ``ROUTES``, row for row (order included: it is the table's order)."""
    out = subprocess.run([find_binary("opa"), "eval", "--format", "json", "-d", str(ROOT / "policies" / "authz.rego"),
                          "data.envoy.authz._routes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)["result"][0]["expressions"][0]["value"]
    assert table == [route.policy_entry() for route in ROUTES]


def test_the_inference_server_serves_every_route_and_no_other():
    from inference.server import build_app
    from tests.inference.helpers import started_engine, tiny_config

    config = tiny_config()
    engine = started_engine(config)
    try:
        app = build_app(config, engine=engine)
        served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    finally:
        engine.shutdown(10)
    listed = {(method, route.path) for route in ROUTES + LOCAL_ROUTES for method in route.methods}
    assert served == listed


def test_the_k8s_probes_use_public_routes():
    docs = list(yaml.safe_load_all((ROOT / "k8s/base/deployment.yaml").read_text()))
    pod = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]
    inference = next(c for c in pod["containers"] if c["name"] == "inference")
    probes = {inference[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    public = {route.path for route in ROUTES + LOCAL_ROUTES if route.public}
    assert probes and probes <= public, probes - public


def test_model_paths_are_the_routes_with_a_model_kind():
    assert MODEL_PATHS == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}
    assert len({r.id for r in ROUTES + LOCAL_ROUTES}) == len(ROUTES + LOCAL_ROUTES)
    assert len({r.path for r in ROUTES + LOCAL_ROUTES}) == len(ROUTES + LOCAL_ROUTES)


@pytest.mark.parametrize("kwargs", [{"public": True, "scope": "models"}, {}, {"scope": "x", "path": "v1/x"},
                                    {"scope": "x", "path": "/v1/x/"}])
def test_a_malformed_route_is_refused(kwargs):
    fields = {"id": "x", "path": "/v1/x", "methods": ("GET",), **kwargs}
    with pytest.raises(ValueError, match="route x"):
        Route(**fields)
