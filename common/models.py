"""Facts of the model routing both sides of the pod name (#15, #16): their one home.

``ROUTED_MODEL_HEADER``: the model the policy routed a request to (Envoy picks the model's
cluster by it; the inference server serves that model). ``MODEL_VERSION_HEADER``: on a
request, the version the policy's canary rollout picked (the sidecar puts it there; clients'
copies are stripped like every ``x-kernelgate-`` header); on a response, plain or streamed,
the version that answered. Tests and benchmarks read the same constants.
"""

from __future__ import annotations

ROUTED_MODEL_HEADER = "x-kernelgate-model"
MODEL_VERSION_HEADER = "x-kernelgate-model-version"
