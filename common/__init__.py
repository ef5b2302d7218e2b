"""Shared helpers at the bottom of the house: every package may import ``common``; ``common`` imports none.

    version      the release string (also pyproject's version and the image tag)
    ports        default ports and loopback addresses of the pod's processes (their one home)
    routes       the HTTP routes the pod serves (inference server, policy, probes check against it)
    replicas     what inference replicas, Envoy and the sidecar agree on (headers, the /load report)
    models       the model-lifecycle facts both sides name (the model-version header)
    settings     config primitives: typed-section ``build``, ``require``, YAML file, env overrides
    strict_json  RFC 8259 JSON (no NaN / Infinity)
    gc_freeze    freeze start-up objects out of the cyclic collector's way
    binaries     where the external programs (opa, envoy, redis-server, jaeger) are
    processes    start / wait for / stop processes on loopback (``kernelgate up`` and tests)

tests/test_architecture.py fails if a module here imports a project package.
"""
