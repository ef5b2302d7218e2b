"""CUDA kernels of sampled requests as spans, recorded around forward passes.

Flow (see docs/tracing.md), one file per step:

* ``selection.py`` -- ``KernelTracer.on_request`` (event loop, from
  ``inference.tracing.Tracing.request_span``) decides once per request whether its forward passes
  are profiled: the trace must be head-sampled, and either its trace id falls inside ``ratio`` or
  the request carries the force header; every capture, forced ones too, spends one of
  ``max_captures_per_minute``.
* ``tracer.py`` -- ``KernelTracer.start``/``finish`` (engine thread, the engine's
  ``forward_observer`` hook) turn the recorder on and off around the first ``steps_per_request``
  forward passes of a selected request that start once the recorder is ready again. That is all
  the request path pays. A worker thread turns the raw record into spans (``_export``), as
  children of a ``gpu.forward`` span per captured pass.
* ``capture.py`` -- the :class:`~otel.kernels.capture.Capture` protocol between the tracer and a
  recorder; the recorders, one file each: ``cupti_capture.py`` (CUPTI's Activity API through
  NVIDIA's ``cupti-python``, on a GPU when that is installed: half the engine-thread cost) and
  ``torch_capture.py`` (torch's profiler: without ``cupti-python``, and for CPU operators);
  ``factory.py`` builds the one the config names.
* ``plan.py`` -- the pure part: clock mapping, folding, caps, on plain data; and each request's
  share of a pass's GPU time (divided by the tokens each sequence put through the pass), which
  the tracer puts on ``gpu.forward`` and, summed, on the request's span before it ends.

Span names and attribute keys come from :mod:`otel.names`. The pure parts are tested without a
GPU; the recorders are the only code that touches torch or CUPTI.
"""
