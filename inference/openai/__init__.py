"""The OpenAI-compatible HTTP surface of the inference server, one folder per endpoint.

Each endpoint folder holds ``protocol`` (parse and validate the request, shape the response
objects; no I/O), ``serving`` (one call, ``create(...)``, that returns a response object or
an async stream of chunks; it talks to the engine through ``inference.generation``'s
``GenerationEngine`` Protocol) and ``router`` (aiohttp routes: read the body, make that one
call, frame what comes back as JSON or SSE). Shared pieces sit beside them: ``protocol``
(errors, sampling fields, usage), ``serving`` (readiness, submitting prompts, merging their
streams, and the one place where a generation response ends), ``preprocess`` (tokenizing on
a worker thread) and ``http`` (body limits, tenant header, JSON/SSE framing).

Nothing here imports torch; ``inference.api`` builds the application from these routers.
"""
