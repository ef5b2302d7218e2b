"""Facts of the model lifecycle both sides of the pod name (#15): their one home.

The inference server names the version of a model that answered a request in
``MODEL_VERSION_HEADER`` (responses, both plain and streamed); tests, benchmarks and, later,
the sidecar's canary routing read the same constant.
"""

from __future__ import annotations

MODEL_VERSION_HEADER = "x-kernelgate-model-version"
