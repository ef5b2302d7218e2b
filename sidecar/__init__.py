"""The ext_authz sidecar: Envoy's CheckRequest (or HTTP authorization request) in, allow/deny out.

Data flow of one check, one module per arrow::

    CheckRequest -> input.py -> identity.py -> decision.py -> ratelimit/ -> response.py

``server.py`` only strings these together.
"""
