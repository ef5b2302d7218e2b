"""The recorder the config names: ``kernels.capture`` (auto, cupti, torch) and ``kernels.activities``.

In: a :class:`~otel.config.KernelTraceConfig`. Out: a :class:`~otel.kernels.capture.Capture`.
The one place that imports torch or cupti-python to build a recorder.
"""

from __future__ import annotations

import importlib.util

from otel.config import KernelTraceConfig
from otel.kernels.capture import Activities, Capture
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.torch_capture import TorchProfilerCapture


def resolve_activities(config: KernelTraceConfig) -> Activities:
    if config.activities != "auto":
        return config.activities
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_capture(config: KernelTraceConfig) -> Capture:
    """The capture ``kernels.capture`` names; ``auto``: CUPTI directly when recording CUDA
    activities and ``cupti-python`` is installed (the ``gpu`` extra), else torch's profiler."""
    activities = resolve_activities(config)
    backend = config.capture
    if backend == "auto":
        backend = "cupti" if activities == "cuda" and importlib.util.find_spec("cupti") is not None else "torch"
    if backend == "torch":
        return TorchProfilerCapture(activities)
    if activities != "cuda":
        raise ValueError(f"kernels.capture: cupti records CUDA kernels, and activities resolved to {activities!r} "
                         "(no CUDA device?); use capture: auto or torch")
    if importlib.util.find_spec("cupti") is None:
        raise ValueError("kernels.capture: cupti needs NVIDIA's cupti-python (pip install 'kernelgate[gpu]')")
    from cupti import cupti
    from torch._C import _demangle

    return CuptiCapture(cupti, demangle=_demangle, prepare_ahead=config.prepare_ahead)
