"""CuptiCapture against the real CUPTI, on a GPU with ``cupti-python`` installed (the ``gpu``
extra); skipped elsewhere. Run on the device: ``python3 -m pytest -q tests/otel/test_cupti_gpu.py``."""

from __future__ import annotations

import importlib.util
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("cupti") is None, reason="needs cupti-python (the gpu extra)"),
]


def test_real_cupti_records_each_pass_inside_its_window_and_attaches_again_after_detaching() -> None:
    from otel.config import KernelTraceConfig
    from otel.kernels.cupti_capture import CuptiCapture
    from otel.kernels.factory import make_capture

    capture = make_capture(KernelTraceConfig(activities="cuda"))
    assert isinstance(capture, CuptiCapture), "auto picks CUPTI on a GPU with cupti-python"
    x = torch.randn(512, 512, device="cuda")
    torch.cuda.synchronize()
    for _ in range(3):  # the 2nd and 3rd capture need the callbacks registered again after finalize
        if not capture.ready():  # attached ahead of a capture (off the engine thread), as the tracer does
            capture.prepare()
        assert capture.ready()
        capture.start()
        lo = time.time_ns()
        y = torch.softmax(x @ x, dim=-1).sum()
        y.item()  # on the host: the pass's kernels are done
        hi = time.time_ns()
        events, anchor = capture.events(capture.stop())
        assert len(events) >= 3, [e.name for e in events]
        assert any("softmax" in e.name.lower() for e in events), [e.name for e in events]
        assert not any(e.name.startswith("_Z") for e in events), "names are demangled"
        assert anchor.uncertainty_ns < 1_000_000
        for e in events:
            assert lo - anchor.uncertainty_ns <= anchor.to_wall(e.start_ns) <= anchor.to_wall(e.end_ns) \
                <= hi + anchor.uncertainty_ns
