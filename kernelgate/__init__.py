"""kernelgate: policy and observability sidecar for GPU inference."""

__version__ = "0.1.0"
