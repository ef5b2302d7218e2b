"""kernelgate's inference server: an OpenAI-compatible aiohttp front end over a batching engine.

Data flows one way. ``api`` mounts one folder per endpoint from ``openai/`` (``completion``,
``chat``, ``embeddings``: ``router`` -> ``serving`` -> ``protocol``); a router makes one call
to its serving object and frames the response or stream it gets back. Serving reaches the
engine only through ``generation`` (the ``GenerationEngine`` Protocol and the plain data
between them): ``engine`` (``scheduler`` + ``runner`` on the engine thread: ``model_loader``,
``attention``/``kv_cache``, ``sampling``, ``detokenize``) -> outputs back through asyncio
queues. ``server`` wires the parts; ``metrics`` and ``tracing`` are passed in. The HTTP side
never imports torch; the engine never sees HTTP.
"""
