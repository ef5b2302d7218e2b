"""Span export in a process of its own: the serving process only flattens spans into plain tuples.

In (serving process): the batch span processor's batches. ``ProcessSpanExporter.export`` turns each
span into a tuple of ints, strings and dicts, pickles the batch (C) and writes it, length-prefixed,
to the pipe of a child process (``python -m otel.export_process``), whose own GIL does the rest.
The kernel tracer's worker sends each captured pass as one compact record instead
(``send_forward``, otel/kernels/emit.py: no SDK span object per kernel in the serving process).
Out (child): the spans rebuilt as SDK ``ReadableSpan`` objects and handed to the exporter that
``telemetry.protocol`` / ``otlp_endpoint`` name (``otel.setup.build_span_exporter``, the same
function the in-process path uses): OTLP encoding and sending never hold the server's GIL.

Why: on a GPU server the engine thread needs the GIL between device waits, and the OTLP
exporters encode in Python (~37 us a plain span, ~290 us an ``engine.step`` span with 16 links
on the development VM, plus hashing the resource for every span); profiled on CPU with py-spy
``--gil``, encoding was the largest part of the GIL time tracing took. Flattening costs a few us a
span. A full pipe blocks only the writing thread (the batch processor's queue then drops spans,
as with a slow collector); a dead child loses spans, never a request (``dropped`` counts them,
``ProcessSpanExporter`` says how).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, BinaryIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel.config import TelemetryConfig

log = logging.getLogger("kernelgate.otel.export_process")

_HEADER = struct.Struct("<I")
_FLUSH = b"F"  # a one-byte frame: write what you have, then answer with one byte
_SPANS = "s"  # a frame of flattened SDK spans: (_SPANS, flat, resource attributes, scopes)
# A frame of records: (_RECORDS, [SpanRecord], [ForwardRecord], resource attributes), as tuples.
_RECORDS = "r"
RECORDS_PER_WRITE = 256  # records buffered before a write (they also go with each batch, and every export_delay_s)
Flat = tuple[Any, ...]


def flatten(spans: Sequence[ReadableSpan]) -> tuple[list[Flat], list[dict[str, Any]], list[Flat]]:
    """Spans as plain tuples (with the resources and scopes they share, each listed once)."""
    resources: dict[int, int] = {}
    resource_attrs: list[dict[str, Any]] = []
    scopes: dict[tuple[str, str | None], int] = {}
    out: list[Flat] = []
    for s in spans:
        ctx = s.context
        parent = s.parent
        resource = s.resource
        r = resources.get(id(resource))
        if r is None:
            r = resources[id(resource)] = len(resource_attrs)
            resource_attrs.append(dict(resource.attributes))
        scope = s.instrumentation_scope
        key = (scope.name, scope.version) if scope is not None else ("", None)
        i = scopes.get(key)
        if i is None:
            i = scopes[key] = len(scopes)
        out.append((
            s.name, ctx.trace_id, ctx.span_id, int(ctx.trace_flags),
            (parent.trace_id, parent.span_id, parent.is_remote) if parent is not None else None,
            s.kind.value, s.start_time, s.end_time, dict(s.attributes) if s.attributes else None,
            [(e.name, e.timestamp, dict(e.attributes) if e.attributes else None) for e in s.events] or None,
            [(li.context.trace_id, li.context.span_id, int(li.context.trace_flags),
              dict(li.attributes) if li.attributes else None) for li in s.links] or None,
            s.status.status_code.value, s.status.description, r, i))
    return out, resource_attrs, list(scopes)


def rebuild(flat: list[Flat], resource_attrs: list[dict[str, Any]], scopes: list[Flat]) -> list[ReadableSpan]:
    """The spans :func:`flatten` flattened, as SDK ``ReadableSpan`` objects (in the child)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    resources = [Resource(attrs) for attrs in resource_attrs]
    scope_objects = [InstrumentationScope(name, version) for name, version in scopes]
    spans = []
    for (name, trace_id, span_id, flags, parent, kind, start, end, attributes, events, links, code, description,
         r, i) in flat:
        spans.append(ReadableSpan(
            name=name, context=SpanContext(trace_id, span_id, False, TraceFlags(flags)),
            parent=SpanContext(parent[0], parent[1], parent[2]) if parent is not None else None,
            resource=resources[r], attributes=attributes or {},
            events=[Event(n, a or {}, t) for n, t, a in events or ()],
            links=[Link(SpanContext(t, sid, False, TraceFlags(f)), a) for t, sid, f, a in links or ()],
            kind=SpanKind(kind), status=Status(StatusCode(code), description), start_time=start, end_time=end,
            instrumentation_scope=scope_objects[i]))
    return spans


class ProcessSpanExporter(SpanExporter):
    """Hands batches to a child process that exports them with the configured exporter.

    Also takes the kernel tracer's passes as compact records (``send_forward``; otel/kernels/emit.py),
    which the child turns into the ``gpu.forward`` and kernel spans. Failure: a child that is gone
    (exited, killed, never started) makes every later batch and record count as ``dropped`` and
    return at once, logged once; a child that stops reading blocks only the thread that writes
    (the batch processor's, whose queue then drops spans; the kernel worker's, whose pending passes
    are then dropped), and ``force_flush`` / ``shutdown`` give up after their timeouts (killing it).
    """

    def __init__(self, config: TelemetryConfig, resource: Any = None, exit_timeout_s: float = 30.0) -> None:
        settings = json.dumps({k: v for k, v in asdict(config).items() if k != "kernels"})
        self._proc = subprocess.Popen([sys.executable, "-m", "otel.export_process", settings],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: BinaryIO = self._proc.stdin
        self._stdout: BinaryIO = self._proc.stdout
        self._lock = threading.Lock()
        # The kernel spans' resource (the tracer provider's), sent with each frame of records.
        self._resource_attrs = dict(resource.attributes) if resource is not None else {}
        self._exit_timeout_s = exit_timeout_s
        self._delay_s = config.export_delay_s
        self._gone = False
        # Records (span_records.SpanRecord, kernels.emit.ForwardRecord) waiting for the next write.
        self._pending_lock = threading.Lock()
        self._records: list[tuple[Any, ...]] = []
        self._forwards: list[tuple[Any, ...]] = []
        self._pending_spans = 0
        self._flusher: threading.Thread | None = None
        self._closed = threading.Event()
        self.sent = 0
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._gone:
            self.dropped += len(spans)
            return SpanExportResult.FAILURE
        self.write_records()  # records waiting go first, in the same wake-up of the child
        payload = pickle.dumps((_SPANS, *flatten(spans)), protocol=pickle.HIGHEST_PROTOCOL)
        if not self._write(payload, len(spans)):
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def send_span(self, record: Any) -> None:
        """A finished span as a record (``otel.span_records.SpanRecord``), built in the child. Records
        are buffered and written together (``write_records``): at ``RECORDS_PER_WRITE``, with the
        next batch of SDK spans, at flush, and at least every ``export_delay_s``."""
        self._add(record, 1, False)

    def send_forward(self, record: Any) -> None:
        """One captured pass's spans (``otel.kernels.emit.ForwardRecord``), built in the child."""
        self._add(record, 1 + len(record.kernels), True)

    def _add(self, record: Any, spans: int, forward: bool) -> None:
        if self._gone:
            self.dropped += spans
            return
        with self._pending_lock:
            (self._forwards if forward else self._records).append(tuple(record))
            self._pending_spans += spans
            full = len(self._records) + len(self._forwards) >= RECORDS_PER_WRITE
        if self._flusher is None:
            self._start_flusher()
        if full:
            self.write_records()

    def write_records(self) -> bool:
        """Write the buffered records as one frame (False: the child is gone, they are dropped)."""
        with self._pending_lock:
            if not self._records and not self._forwards:
                return True
            records, forwards, spans = self._records, self._forwards, self._pending_spans
            self._records, self._forwards, self._pending_spans = [], [], 0
        if self._gone:
            self.dropped += spans
            return False
        return self._write(pickle.dumps((_RECORDS, records, forwards, self._resource_attrs),
                                        protocol=pickle.HIGHEST_PROTOCOL), spans)

    def _start_flusher(self) -> None:
        with self._pending_lock:
            if self._flusher is not None:
                return
            self._flusher = threading.Thread(target=self._flush_records_every, name="kernelgate-span-records",
                                             daemon=True)
        self._flusher.start()

    def _flush_records_every(self) -> None:
        while not self._closed.wait(self._delay_s):
            self.write_records()

    def _write(self, payload: bytes, spans: int) -> bool:
        try:
            with self._lock:
                self._stdin.write(_HEADER.pack(len(payload)) + payload)
                self._stdin.flush()
        except (OSError, ValueError):  # the child is gone: these spans are lost, serving goes on
            self._lost(spans)
            return False
        self.sent += spans
        return True

    def _lost(self, spans: int) -> None:
        self.dropped += spans
        if not self._gone:
            self._gone = True
            log.warning("span export process is gone (exit code %s): spans are dropped from now on",
                        self._proc.poll())

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the child has exported everything written so far (False: gone, or not within the timeout)."""
        if self._gone or not self.write_records() or not self._lock.acquire(timeout=timeout_millis / 1000):
            return False
        try:
            self._stdin.write(_HEADER.pack(len(_FLUSH)) + _FLUSH)
            self._stdin.flush()
            ready, _, _ = select.select([self._stdout], [], [], timeout_millis / 1000)
            return bool(ready) and self._stdout.read(1) == b"1"
        except (OSError, ValueError):
            self._lost(0)
            return False
        finally:
            self._lock.release()

    def shutdown(self) -> None:
        """Let the child export what it has and exit (killed if it has not within ``exit_timeout_s``)."""
        self._closed.set()
        if self._proc.poll() is None and not self._gone:
            self.write_records()
        if self._proc.poll() is None:
            # A writer blocked on a child that stopped reading holds the lock: kill the child, which
            # ends that write (EPIPE), rather than wait for it.
            if self._lock.acquire(timeout=min(self._exit_timeout_s, 5.0)):
                try:
                    self._stdin.close()
                except OSError:
                    pass
                finally:
                    self._lock.release()
            else:
                self._proc.kill()
            try:
                self._proc.wait(timeout=self._exit_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("span export process did not exit; killed")
                self._proc.kill()
                self._proc.wait()
        self._gone = True
        for stream in (self._stdin, self._stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def _spans_of(frame: tuple[Any, ...], cache: dict[Any, Any]) -> list[ReadableSpan]:
    """The SDK spans of one frame (in the child)."""
    if frame[0] == _SPANS:
        return rebuild(*frame[1:])
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from otel import names
    from otel.kernels.emit import ForwardRecord, readable_spans
    from otel.span_records import SpanRecord, readable_span

    _, records, forwards, resource_attrs = frame
    key = tuple(sorted(resource_attrs.items()))
    resource = cache.get(key)
    if resource is None:
        resource = cache[key] = Resource(resource_attrs)

    def scope(name: str) -> InstrumentationScope:
        found = cache.get(("scope", name))
        if found is None:
            found = cache[("scope", name)] = InstrumentationScope(name)
        return found

    spans = [readable_span(r, resource, scope(r.scope)) for r in map(SpanRecord._make, records)]
    kernels = scope(names.KERNELS_TRACER)
    for forward in forwards:
        spans.extend(readable_spans(ForwardRecord._make(forward), resource, kernels))
    return spans


def main(argv: list[str] | None = None) -> int:
    """The child: read frames from stdin until it closes, export each batch."""
    from common.settings import build
    from otel.setup import build_span_exporter

    args = sys.argv[1:] if argv is None else argv
    config = build(TelemetryConfig, json.loads(args[0]), "telemetry")
    exporter = build_span_exporter(config)
    cache: dict[Any, Any] = {}  # resources and scopes, made once
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            header = _read_exactly(stdin, _HEADER.size)
            if header is None:
                return 0
            body = _read_exactly(stdin, _HEADER.unpack(header)[0])
            if body is None:
                return 0
            if body == _FLUSH:
                stdout.write(b"1" if exporter.force_flush() is not False else b"0")
                stdout.flush()
                continue
            try:
                exporter.export(_spans_of(pickle.loads(body), cache))
            except Exception:  # noqa: BLE001 - a bad batch loses its spans, not the exporter
                log.exception("span batch not exported")
    finally:
        exporter.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
