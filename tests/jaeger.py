"""A real Jaeger v2 (in-memory storage) on free loopback ports, and reading traces back from it.

Tests export OTLP to ``Jaeger.otlp_grpc`` / ``Jaeger.otlp_http`` and read what Jaeger stored
through its query API (``/api/v3``, which returns OTLP JSON: parent ids, kinds and links
exactly as exported). ``pytest_jaeger`` is the fixture body; test modules bind it with
``jaeger = pytest.fixture(scope=...)(pytest_jaeger)`` so tests/conftest.py stays untouched.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests import procs

# OTLP span kinds, as numbers in OTLP JSON.
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def jaeger_config(otlp_grpc: int, otlp_http: int, query_http: int, query_grpc: int, health: int,
                  max_traces: int = 10000) -> dict[str, Any]:
    """The collector pipeline OTLP -> memory store, and the query API on loopback."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                     "exporters": ["jaeger_storage_exporter"]}},
            # Jaeger's own metrics would bind :8888; tests may run several Jaegers at once.
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"127.0.0.1:{health}"}},
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": max_traces}}}},
            "jaeger_query": {"storage": {"traces": "memstore"},
                             "http": {"endpoint": f"127.0.0.1:{query_http}"},
                             "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"}},
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{otlp_grpc}"},
                                             "http": {"endpoint": f"127.0.0.1:{otlp_http}"}}}},
        # Short batches: tests wait for spans, production keeps the default.
        "processors": {"batch": {"timeout": "50ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


# --- traces as read back ---------------------------------------------------------------------------
def _value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _attrs(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items or []}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[Link, ...]
    status_code: int

    def __repr__(self) -> str:  # readable assertion failures
        return f"Span({self.service}:{self.name} {self.span_id} <- {self.parent_id or '-'})"


@dataclass
class Trace:
    trace_id: str
    spans: list[Span] = field(default_factory=list)

    def named(self, name: str, service: str | None = None) -> list[Span]:
        return [s for s in self.spans if s.name == name and (service is None or s.service == service)]

    def one(self, name: str, service: str | None = None) -> Span:
        found = self.named(name, service)
        assert len(found) == 1, f"expected one {name!r} span, got {found} in {self.outline()}"
        return found[0]

    def by_id(self, span_id: str) -> Span | None:
        return next((s for s in self.spans if s.span_id == span_id), None)

    def parent(self, span: Span) -> Span | None:
        return self.by_id(span.parent_id) if span.parent_id else None

    def children(self, span: Span) -> list[Span]:
        return sorted((s for s in self.spans if s.parent_id == span.span_id), key=lambda s: s.start_ns)

    def ancestors(self, span: Span) -> list[Span]:
        out, cur = [], self.parent(span)
        while cur is not None:
            out.append(cur)
            cur = self.parent(cur)
        return out

    def roots(self) -> list[Span]:
        return [s for s in self.spans if not s.parent_id or self.by_id(s.parent_id) is None]

    def services(self) -> set[str]:
        return {s.service for s in self.spans}

    def outline(self) -> str:
        """The tree as indented text, for failure messages and docs."""
        lines: list[str] = []

        def walk(span: Span, depth: int) -> None:
            lines.append(f"{'  ' * depth}{span.service}: {span.name} ({span.kind})")
            for child in self.children(span):
                walk(child, depth + 1)

        for root in sorted(self.roots(), key=lambda s: s.start_ns):
            walk(root, 0)
        return "\n".join(lines)


def parse_otlp(*payloads: dict[str, Any]) -> dict[str, Trace]:
    """OTLP/JSON -> traces by id: /api/v3's ``{"result": {"resourceSpans": [...]}}``, or the
    ``{"resourceSpans": [...]}`` lines of otel/otlp_file.py (several payloads merge)."""
    traces: dict[str, Trace] = {}
    resource_spans = [rs for p in payloads for rs in p.get("result", p).get("resourceSpans", [])]
    for rs in resource_spans:
        service = _attrs(rs.get("resource", {}).get("attributes")).get("service.name", "")
        for ss in rs.get("scopeSpans", []):
            for raw in ss.get("spans", []):
                span = Span(trace_id=raw["traceId"], span_id=raw["spanId"], parent_id=raw.get("parentSpanId", ""),
                            name=raw["name"], service=service, kind=KIND_NAMES.get(raw.get("kind", 0), "?"),
                            start_ns=int(raw["startTimeUnixNano"]), end_ns=int(raw["endTimeUnixNano"]),
                            attributes=_attrs(raw.get("attributes")),
                            links=tuple(Link(li["traceId"], li["spanId"], _attrs(li.get("attributes")))
                                        for li in raw.get("links", [])),
                            status_code=int(raw.get("status", {}).get("code", 0)))
                traces.setdefault(span.trace_id, Trace(span.trace_id)).spans.append(span)
    return traces


# --- the process -----------------------------------------------------------------------------------
@dataclass
class Jaeger:
    workdir: Path
    otlp_grpc: int = 0
    otlp_http: int = 0
    query_http: int = 0
    query_grpc: int = 0
    health: int = 0
    proc: procs.Proc | None = None

    def start(self) -> "Jaeger":
        for name in ("otlp_grpc", "otlp_http", "query_http", "query_grpc", "health"):
            if not getattr(self, name):
                setattr(self, name, procs.free_port())
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "jaeger.yaml"
        config.write_text(yaml.safe_dump(jaeger_config(self.otlp_grpc, self.otlp_http, self.query_http,
                                                       self.query_grpc, self.health)))
        self.proc = procs.start("jaeger", [procs.find_binary("jaeger"), "--config", str(config)], self.workdir,
                                otlp_grpc=self.otlp_grpc, query_http=self.query_http)
        procs.wait_http(f"http://127.0.0.1:{self.health}/status", proc=self.proc)
        procs.wait_tcp(self.otlp_grpc, proc=self.proc)
        procs.wait_tcp(self.query_http, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def otlp_grpc_address(self) -> str:
        return f"127.0.0.1:{self.otlp_grpc}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_http}"

    # --- query API ---------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        url = self.query_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # "No traces found"
                return None
            raise

    def trace(self, trace_id: str) -> Trace | None:
        payload = self._get(f"/api/v3/traces/{trace_id}")
        return parse_otlp(payload).get(trace_id) if payload else None

    def find(self, service: str, operation: str | None = None, lookback_s: float = 3600,
             limit: int = 100) -> list[Trace]:
        """Whole traces holding a span of ``service`` (and ``operation``), newest data first."""
        now = time.time()
        params = {"query.service_name": service,
                  "query.start_time_min": _rfc3339(now - lookback_s), "query.start_time_max": _rfc3339(now + 60),
                  "query.num_traces": limit}
        if operation:
            params["query.operation_name"] = operation
        payload = self._get("/api/v3/traces", params)
        return list(parse_otlp(payload).values()) if payload else []

    def services(self) -> list[str]:
        payload = self._get("/api/v3/services")
        return list(payload.get("services", [])) if payload else []

    def wait_trace(self, trace_id: str, min_spans: int = 1, timeout: float = 20.0,
                   until: Any = None) -> Trace:
        """Poll until the trace holds ``min_spans`` spans (and ``until(trace)`` is true)."""
        deadline = time.monotonic() + timeout
        last: Trace | None = None
        while time.monotonic() < deadline:
            last = self.trace(trace_id)
            if last is not None and len(last.spans) >= min_spans and (until is None or until(last)):
                return last
            time.sleep(0.1)
        raise TimeoutError(f"trace {trace_id} has {len(last.spans) if last else 0} spans after {timeout}s "
                           f"(wanted {min_spans}):\n{last.outline() if last else ''}")

    def wait_find(self, service: str, operation: str | None = None, timeout: float = 20.0,
                  until: Any = None) -> list[Trace]:
        """Poll ``find`` until it returns traces (satisfying ``until(traces)``)."""
        deadline = time.monotonic() + timeout
        found: list[Trace] = []
        while time.monotonic() < deadline:
            found = self.find(service, operation)
            if found and (until is None or until(found)):
                return found
            time.sleep(0.1)
        raise TimeoutError(f"no trace of {service}/{operation} after {timeout}s ({len(found)} found)")


    def wait_span_trace(self, service: str, operation: str, attribute: str, value: Any,
                        timeout: float = 20.0, until: Any = None) -> Trace:
        """The whole trace holding the ``service``/``operation`` span whose ``attribute`` is ``value``."""
        def match(traces: list[Trace]) -> Trace | None:
            return next((t for t in traces if any(s.name == operation and s.attributes.get(attribute) == value
                                                   for s in t.spans)), None)

        found = match(self.wait_find(service, operation, timeout, until=lambda ts: match(ts) is not None))
        assert found is not None
        return self.wait_trace(found.trace_id, timeout=timeout, until=until)


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1e6):06d}Z"


def pytest_jaeger(tmp_path_factory: Any) -> Iterator[Jaeger]:
    """Fixture body: one Jaeger for the fixture's scope (bind it with ``pytest.fixture``)."""
    jaeger = Jaeger(tmp_path_factory.mktemp("jaeger")).start()
    try:
        yield jaeger
    finally:
        jaeger.stop()
