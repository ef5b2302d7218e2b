"""kernelgate: policy and observability sidecar for GPU inference.

Entry points only (the top of the house): the CLI, ``up``, the Envoy config generator, ``inject``,
the policy bundle and the one config loader (``kernelgate.config``). Nothing outside
kernelgate/, tests/, bench/ and scripts/ imports this package (tests/test_architecture.py).
"""

from common.version import __version__

__all__ = ["__version__"]
