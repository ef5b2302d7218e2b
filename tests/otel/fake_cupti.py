"""A fake of ``cupti.cupti`` (NVIDIA's cupti-python) that behaves as CUPTI did on the H100."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace


class FakeCupti:
    """What CuptiCapture uses of ``cupti.cupti``, with the behaviour measured on the H100
    (bench/results/cupti_direct.json): records only while a kind is enabled *and* buffer
    callbacks are registered, ``finalize`` forgets the callbacks, ``activity_flush_all``
    hands the buffered records to the completed callback on the calling thread. Its clock
    runs ``OFFSET`` behind the wall clock, like CUPTI's own timestamp base."""

    OFFSET = 123_456_789_000

    class ActivityKind:
        MEMCPY = 1
        CONCURRENT_KERNEL = 10

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.callbacks = None
        self.enabled: set[int] = set()
        self.buffered: list = []
        self.fail: dict[str, Exception] = {}
        self.threads: list[str] = []  # the thread of each call, aligned with calls
        self.delays: dict[str, float] = {}  # seconds a call takes (attaching takes ~15 ms on a GPU)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        self.threads.append(threading.current_thread().name)
        delay = self.delays.get(name)
        if delay:
            time.sleep(delay)
        if name in self.fail:
            raise self.fail.pop(name)

    def activity_register_callbacks(self, requested, completed) -> None:
        self._call("register")
        self.callbacks = (requested, completed)

    def activity_enable(self, kind: int) -> None:
        self._call("enable")
        self.enabled.add(kind)

    def activity_disable(self, kind: int) -> None:
        self._call("disable")
        self.enabled.discard(kind)

    def activity_flush_all(self, flag: int) -> None:
        self._call("flush")
        if self.callbacks and self.buffered:
            size, _ = self.callbacks[0]()
            assert size > 0
            records, self.buffered = self.buffered, []
            self.callbacks[1](records)

    def finalize(self) -> None:
        self._call("finalize")
        self.callbacks, self.enabled, self.buffered = None, set(), []

    def get_timestamp(self) -> int:
        return time.time_ns() - self.OFFSET

    def launch(self, name: str, duration_ns: int = 20_000, kind: int = ActivityKind.CONCURRENT_KERNEL,
               graph_id: int = 0) -> int:
        """A kernel (or copy) runs now, recorded if CUPTI listens; returns when it started (wall clock).
        ``graph_id``: the CUDA graph whose replay launched it (0: launched on its own)."""
        start = self.get_timestamp()
        if kind in self.enabled and self.callbacks:
            self.buffered.append(SimpleNamespace(kind=kind, name=name, start=start, end=start + duration_ns,
                                                 device_id=0, stream_id=7, graph_id=graph_id))
        return start + self.OFFSET

    def deliver_full_buffer(self) -> None:
        """CUPTI hands a full buffer back on a thread of its own, before any flush."""
        records, self.buffered = self.buffered, []
        worker = threading.Thread(target=self.callbacks[1], args=(records,))
        worker.start()
        worker.join()


GEMM = "_ZN2at6native4gemmIfLi4EEEvPfi"


def fake_demangle(name: str) -> str:
    return {GEMM: "void at::native::gemm<float, 4>(float*, int)"}.get(name, name)
