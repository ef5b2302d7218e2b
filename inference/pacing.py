"""Pacing a version that loads beside serving ones (#15 hot swap): its work yields to theirs.

A version loaded through the admin API starts up on its own engine thread while the active
version's engine thread serves: model build, warm-up, one CUDA-graph capture per decode bucket,
the start-up collection, the sampler, the grammar tables, then its probe and shadow steps. All
of it is Python that holds the GIL, and on the GPU all of it queues kernels beside the serving
version's. A serving engine thread gives the GIL up at every blocking call of a step (reading the
step's tokens, a graph replay, waking the event loop) and then waits for it, up to a whole switch
interval each time, while the loading thread runs: a GIL convoy that made the serving version's
steps several times as long during a swap on the H200 (``bench/results/hot_swap_gpu.json``).

:class:`LoadPacer` is the loading engine's side of it. The engine cuts its start-up into chunks
(a stage, one captured graph, one probe or shadow step) and calls :meth:`LoadPacer.pause` after
each with how long the chunk took. While some serving engine is busy (sequences running or
waiting), the pause lasts until every busy serving engine has finished at least one more step and
at least ``share`` x the chunk's time has gone by, never more than ``max_pause_s``: the serving
version then runs at least one step, and at least as long as the loader ran (``share`` 1), free of
the loading thread's GIL hold and kernels. With no busy serving engine a pause returns at once. The
registry makes one pacer per version it loads beside serving ones and stops it (:meth:`stop`) when
the version is validated or failed, before it can serve live traffic.

It paces by steps and time, never by the GIL itself (Python has no thread priorities); the lowered
switch interval while a version loads (``inference.models.registry``) bounds what is left: the
waits inside one chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

POLL_S = 0.0002
MAX_PAUSE_S = 0.05


class LoadPacer:
    """See the module docstring. ``serving`` lists the engines that serve now (not the one paced); each
    has ``stats()`` with ``running``, ``waiting`` and ``steps`` (``inference.engine.Engine``)."""

    def __init__(self, serving: Callable[[], Iterable[Any]], share: float = 1.0, max_pause_s: float = MAX_PAUSE_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._serving = serving
        self._share = share
        self._max_pause_s = max_pause_s
        self._sleep = sleep
        self._active = True
        self._lock = threading.Lock()
        self.pauses = 0  # pauses that waited for a busy serving engine
        self.paused_s = 0.0  # their total length
        self.chunks: list[tuple[str, float, float]] = []  # (what, chunk s, pause s), the recent ones
        self.stepped: list[bool] = []  # per pause: every busy serving engine finished a step during it

    @property
    def active(self) -> bool:
        return self._active

    def stop(self) -> None:
        """The version is validated (or failed): its work no longer yields."""
        self._active = False

    def pause(self, chunk_s: float, what: str = "") -> float:
        """Yield to the busy serving engines after a chunk of ``chunk_s`` seconds; return the pause's length."""
        if not self._active:
            return 0.0
        busy = self._busy()
        if not busy:
            return 0.0
        started = time.monotonic()
        want_until = started + min(self._share * max(chunk_s, 0.0), self._max_pause_s)
        deadline = started + self._max_pause_s
        steps = [(engine, engine.stats().steps) for engine in busy]
        stepped = False
        while True:
            now = time.monotonic()
            if not stepped:
                stepped = all(engine.stats().steps > before for engine, before in steps)
            if (stepped and now >= want_until) or now >= deadline:
                break
            self._sleep(POLL_S)
        took = time.monotonic() - started
        with self._lock:
            self.pauses += 1
            self.paused_s += took
            self.stepped.append(stepped)
            self.chunks.append((what, chunk_s, took))
            del self.chunks[:-256], self.stepped[:-256]
        return took

    def _busy(self) -> list[Any]:
        try:
            engines = list(self._serving())
        except RuntimeError:  # the registry's versions changed while listed (event loop thread): no pause
            return []
        busy = []
        for engine in engines:
            try:
                stats = engine.stats()
            except Exception:  # noqa: BLE001 - an engine going away is not busy
                continue
            if stats.running or stats.waiting:
                busy.append(engine)
        return busy
