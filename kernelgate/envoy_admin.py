"""Stopping Envoy without cutting requests: drain listeners, wait for in-flight requests, then exit.

Envoy exits at once on SIGTERM; its admin API can first stop new connections
(``/drain_listeners?graceful``) and report the requests still active, which is what
``kernelgate up`` (and a Kubernetes preStop hook) use before the signal.
"""

from __future__ import annotations

import json
import time
import urllib.request


def active_requests(admin_url: str) -> int:
    """Downstream requests Envoy is still serving, over every listener."""
    with urllib.request.urlopen(f"{admin_url}/stats?format=json&filter=downstream_rq_active$", timeout=2) as resp:
        stats = json.load(resp).get("stats", [])
    # http.admin.* counts this very stats query; only the traffic listeners matter
    return sum(int(s.get("value", 0)) for s in stats
               if s.get("name", "").startswith("http.") and not s["name"].startswith("http.admin."))


def drain(admin_url: str, timeout_s: float = 30.0, poll_s: float = 0.1) -> bool:
    """Stop accepting, wait until no request is in flight (or the timeout); True when drained."""
    request = urllib.request.Request(f"{admin_url}/drain_listeners?graceful&inboundonly", method="POST")
    with urllib.request.urlopen(request, timeout=2):
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if active_requests(admin_url) == 0:
            return True
        time.sleep(poll_s)
    return False
