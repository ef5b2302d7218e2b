"""kernelgate's inference server: an OpenAI-compatible aiohttp front end over a batching engine.

Data flows one way: ``api`` (HTTP) -> ``protocol`` (parse/validate) -> ``serving`` ->
``preprocess`` (tokenize, worker thread) -> ``engine`` (``scheduler`` + ``runner`` on the
engine thread: ``model_loader``, ``attention``/``kv_cache``, ``sampling``, ``detokenize``)
-> outputs back through asyncio queues. ``server`` wires the parts; ``metrics`` and
``tracing`` are passed in. The HTTP side never imports torch; the engine never sees HTTP.
"""
