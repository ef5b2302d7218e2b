"""The registry of served models: one engine per loaded version, and which version is active.

In: the ``InferenceConfig`` (``served_models``, ``validation``), a factory that builds an
engine for a ``(ModelConfig, BatchingConfig)`` and one that builds the serving object of a
version (``inference.openai.serving.GenerationServing``, one per version). Out:
:meth:`ModelRegistry.lease` — the serving layer asks for "model X" (or a named version of it)
and holds the lease until the response ends, streams included, so a request finishes on the
version it started on. A request may name a version (the sidecar's canary pick, from the
policy's rollout weights): a validated (``ready``) version then serves it beside the active
one, and a version rolled back, unknown or not ready falls back to the active one. Each
response's outcome (:meth:`observe`) feeds the version's health window; a canary worse than
the active version past ``inference.rollback``'s margins is rolled back at once
(``rolled_back``: no more requests here, and ``/load`` tells the sidecar, which sets its
weight to 0 in OPA's data). Also and the lifecycle calls the admin API makes: :meth:`load` (memory check, then load +
validation in the background), :meth:`activate` (an atomic switch of the active pointer; the
old version drains and its engine is shut down, its memory freed, when its last lease ends),
:meth:`unload` and :meth:`status`.

States of a version::

    loading -> validating -> ready -> active -> draining -> unloaded
        \\            \\         \\
         `-> failed <-'        `-> rolled_back -> draining     (ready -> draining by unload;
                                                                 failed keeps its reason)

Everything here runs on the event loop thread (the engine threads only load and decode), so
the switch of the active version is one assignment between two awaits: atomic for requests.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from inference.config import BatchingConfig, InferenceConfig, ModelConfig, ServedModelConfig, VersionConfig
from inference.models import memory
from inference.models.rollback import HealthWindow, judge
from inference.models.errors import (LifecycleError, ModelNotReady, UnknownModel, UnknownVersion,
                                     VersionConflict)
from inference.models.validation import ValidationResult, validate
from inference.pacing import LoadPacer

log = logging.getLogger("kernelgate.inference.models")

SMALL_WINDOWS = 2048
JUDGE_INTERVAL_S = 0.25
# The interpreter's switch interval while a version loads or validates beside serving ones
# (Python's default is 5 ms). A loading thread runs long stretches of Python (building modules, tracing decode steps
# for CUDA-graph capture); a serving engine thread that gave up the GIL (a sync, a graph replay, waking
# the event loop) waits up to the whole interval to get it back, at every such call of every step (a
# GIL convoy). 0.5 ms still made the serving version's steps several times as long on the H200; at
# 50 us a hand-off costs the serving thread at most that, and the loading thread a few percent more
# forced switches. The loading engine's work also yields between chunks (``inference.pacing``).
LOADING_SWITCH_INTERVAL_S = 0.00005

VersionState = Literal["loading", "validating", "ready", "active", "draining", "failed", "rolled_back", "unloaded"]


class LifecycleEngine(Protocol):
    """What the registry needs of an engine (``inference.engine.Engine``)."""

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> BaseException | None: ...

    @property
    def started(self) -> bool: ...

    info: Any

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...

    def submit(self, request: Any) -> Any: ...

    def stats(self) -> Any: ...


# (model, batching, pacer) -> engine; pacer: loaded while others serve (the admin API), its work yields to
# theirs through the pacer (``inference.pacing``); None: a start-up version
EngineFactory = Callable[[ModelConfig, BatchingConfig, LoadPacer | None], LifecycleEngine]
ServiceFactory = Callable[[str, VersionConfig, LifecycleEngine], Any]  # (model, version, engine) -> serving


@dataclass
class ModelVersion:
    """One loaded (or loading, or retired) version of a model."""

    model: str
    version: str
    source: str
    engine: LifecycleEngine | None
    service: Any
    owned: bool = True
    state: VersionState = "loading"
    error: str | None = None
    leases: int = 0
    estimate: memory.MemoryEstimate | None = None
    pacer: LoadPacer | None = None  # while it loads and validates beside serving versions
    validation: ValidationResult | None = None
    activate_when_valid: bool = False
    loaded_at: float = field(default_factory=time.time)
    activated_at: float | None = None
    served: int = 0
    health: HealthWindow | None = None
    judged_at: float = float("-inf")
    rolled_back_at: float | None = None
    rollbacks: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "state": self.state, "source": self.source,
                               "in_flight": self.leases, "served": self.served, "loaded_at": self.loaded_at,
                               "activated_at": self.activated_at}
        if self.error is not None:
            out["error"] = self.error
        if self.estimate is not None:
            out["memory"] = {"device": self.estimate.device, "weights_bytes": self.estimate.weights_bytes,
                             "kv_cache_bytes": self.estimate.kv_cache_bytes}
        if self.validation is not None:
            out["validation"] = self.validation.describe()
        if self.pacer is not None:
            out["pacing"] = {"active": self.pacer.active, "pauses": self.pacer.pauses,
                             "paused_ms": round(self.pacer.paused_s * 1e3, 1)}
        slow_steps = getattr(self.engine, "slow_steps", None)
        if slow_steps is not None:
            out["slow_steps"] = [[round(at, 4), round(took, 2), round(gap, 2), phase, batch]
                                 for at, took, gap, phase, batch in slow_steps()]
        if self.health is not None:
            out["health"] = self.health.health(time.monotonic()).describe()
        out["rollbacks"] = self.rollbacks
        if self.rolled_back_at is not None:
            out["rolled_back_at"] = self.rolled_back_at
        return out


class Lease:
    """One version of a model, held for one request; ``release`` (or leaving the ``with``) ends it."""

    def __init__(self, registry: ModelRegistry, entry: ModelVersion) -> None:
        self._registry = registry
        self._entry = entry
        self._released = False

    @property
    def version(self) -> str:
        return self._entry.version

    @property
    def serving(self) -> Any:
        return self._entry.service

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Model:
    config: ServedModelConfig
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    active: ModelVersion | None = None
    recent: deque[tuple[int, ...]] = field(default_factory=deque)


class ModelRegistry:
    """The served models and their versions; see the module docstring."""

    def __init__(self, config: InferenceConfig, build_engine: EngineFactory, build_service: ServiceFactory,
                 check_memory: bool = True) -> None:
        self._config = config
        self._build_engine = build_engine
        self._build_service = build_service
        self._check_memory = check_memory
        self._memory = memory.MemoryEstimator()  # weight counts per architecture: a same-shape load builds nothing
        self._models = {m.name: _Model(m, recent=deque(maxlen=config.validation.recent_prompts))
                        for m in config.served_models}
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_error: BaseException | None = None
        self._starting: asyncio.Task[None] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        self._loads = 0  # versions loading beside serving ones (the switch interval is lowered)
        self._switch_interval = sys.getswitchinterval()

    # -- serving side -----------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._models)

    def lease(self, model: str, version: str | None = None) -> Lease:
        """``version`` of ``model`` when it is a validated canary, else the active version, for one
        request; raises UnknownModel or ModelNotReady."""
        m = self._model(model)
        entry = m.active
        wanted = m.versions.get(version) if version is not None else None
        if wanted is not None and wanted.state == "ready" and wanted.engine is not None and wanted.engine.ready:
            entry = wanted
        if entry is None or entry.engine is None or not entry.engine.ready:
            raise ModelNotReady(f"model '{model}' is still loading")
        entry.leases += 1
        entry.served += 1
        return Lease(self, entry)

    def observe(self, model: str, version: str, ttft_s: float | None, error: str | None) -> None:
        """One response of ``version`` ended; a canary past the rollback margins is rolled back."""
        m = self._models[model]
        entry = m.versions.get(version)
        if entry is None or entry.health is None:
            return
        now = time.monotonic()
        entry.health.record(now, ttft_s, error)
        stable = m.active
        rule = self._config.rollback
        if not rule.enabled or entry.state != "ready" or stable is None or stable.health is None:
            return
        # Judged after every canary response while the windows are small; with thousands of
        # outcomes in them (a busy model) at most every JUDGE_INTERVAL_S (a median is a sort).
        if len(entry.health) + len(stable.health) > SMALL_WINDOWS and now - entry.judged_at < JUDGE_INTERVAL_S:
            return
        entry.judged_at = now
        reason = judge(entry.health.health(now), stable.health.health(now), rule)
        if reason is not None:
            self.roll_back(model, version, reason)

    def roll_back(self, model: str, version: str, reason: str) -> ModelVersion:
        """Take a canary out of serving: requests naming it go to the active version from now on."""
        m = self._model(model)
        entry = self._version(m, version)
        if entry.state != "ready":
            raise VersionConflict(f"version '{version}' of model '{model}' is {entry.state}; only a canary "
                                  "(ready, not active) is rolled back")
        entry.state = "rolled_back"
        entry.error = f"rolled back: {reason}"
        entry.rolled_back_at = time.time()
        entry.rollbacks += 1
        log.warning("model %s: canary %s rolled back: %s", model, version, reason)
        self._event(model, version, "rolled_back", reason=reason)
        return entry

    def rolled_back(self, model: str) -> list[str]:
        """The versions of ``model`` rolled back (until unloaded): the sidecar sets their weight to 0."""
        return [v.version for v in self._model(model).versions.values() if v.state == "rolled_back"]

    def record(self, model: str, prompts: Iterable[Any]) -> None:
        recent = self._models[model].recent
        for prompt in prompts:
            ids = getattr(prompt, "token_ids", prompt)
            recent.append(tuple(ids))

    @property
    def ready(self) -> bool:
        """Every model has an active version that is ready."""
        return all(m.active is not None and m.active.engine is not None and m.active.engine.ready
                   for m in self._models.values())

    @property
    def failure(self) -> BaseException | None:
        if self._start_error is not None:
            return self._start_error
        for m in self._models.values():
            if m.active is not None and m.active.engine is not None and m.active.engine.failure is not None:
                return m.active.engine.failure
        return None

    def routed_stats(self, model: str) -> list[Any]:
        """The load of each version of ``model`` that new requests go to."""
        m = self._model(model)
        routed = [v for v in m.versions.values() if v is m.active or v.state == "ready"]
        return [v.engine.stats() for v in routed if v.engine is not None and v.engine.ready]

    # -- start-up ---------------------------------------------------------------------------

    def adopt(self, model: str, version: str, engine: LifecycleEngine) -> None:
        """Serve an engine built elsewhere (not owned: never shut down here) as the active version."""
        entry = ModelVersion(model, version, "external engine", engine,
                             self._build_service(model, VersionConfig(version), engine), owned=False,
                             state="active", activated_at=time.time(), health=self._health())
        m = self._model(model)
        m.versions[version] = entry
        m.active = entry
        if not engine.started:
            engine.start()

    def start_in_background(self) -> None:
        """``start`` off the event loop, so the server listens (``/readyz`` 503) while models load;
        a start-up version that cannot load (too big, unreadable) is the server's ``failure``."""
        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.start)
            except Exception as exc:  # noqa: BLE001 - reported by /healthz and the log
                log.error("loading the configured models failed: %s", exc)
                self._start_error = exc

        self._starting = asyncio.get_running_loop().create_task(run(), name="load-configured-models")

    def start(self) -> None:
        """Load every model's configured active version (no validation: it is the baseline)."""
        for m in self._models.values():
            if m.active is not None:
                continue
            version = next(v for v in m.config.versions if v.version == m.config.active_version)
            entry = self._create(m, version, beside_serving=False)
            entry.state = "active"
            entry.activated_at = time.time()
            m.active = entry

    # -- lifecycle (admin API) --------------------------------------------------------------

    async def load(self, model: str, version: VersionConfig, activate: bool = False) -> ModelVersion:
        """Check memory, start loading ``version``; validation (then activation, when asked) runs in the
        background. Raises at once (nothing changes) when the model is unknown, the version exists,
        or it does not fit in memory."""
        m = self._model(model)
        existing = m.versions.get(version.version)
        if existing is not None and existing.state not in ("failed", "unloaded"):
            raise VersionConflict(f"version '{version.version}' of model '{model}' is already {existing.state}")
        loop = asyncio.get_running_loop()
        self._loading(+1)
        try:
            entry = await loop.run_in_executor(None, self._create, m, version, True)
        except BaseException:
            self._loading(-1)
            raise
        entry.activate_when_valid = activate
        task = asyncio.create_task(self._validate(m, entry), name=f"validate-{model}-{version.version}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return entry

    def activate(self, model: str, version: str) -> ModelVersion:
        """Make a validated version the active one; the old one drains, then is shut down."""
        m = self._model(model)
        entry = self._version(m, version)
        if entry is m.active:
            return entry
        if entry.state != "ready":
            raise VersionConflict(f"version '{version}' of model '{model}' is {entry.state}"
                                  + (f" ({entry.error})" if entry.error else "") + "; only a validated (ready) "
                                  "version can be activated")
        old = m.active
        m.active = entry  # the switch: new leases go to ``entry`` from here on
        entry.state = "active"
        entry.activated_at = time.time()
        self._event(model, version, "activated", previous=old.version if old else None)
        log.info("model %s: version %s active (was %s)", model, version, old.version if old else None)
        if old is not None:
            old.state = "draining"
            if old.leases == 0:
                self._retire(old)
        return entry

    def unload(self, model: str, version: str) -> ModelVersion:
        """Unload a version that is not active (ready, failed, or still loading)."""
        m = self._model(model)
        entry = self._version(m, version)
        if entry is m.active:
            raise VersionConflict(f"version '{version}' of model '{model}' is active; activate another first")
        if entry.state in ("draining", "unloaded"):
            return entry
        entry.state = "draining"
        if entry.leases == 0:
            self._retire(entry)
        return entry

    def status(self) -> dict[str, Any]:
        return {"models": [{"name": name, "active": m.active.version if m.active else None,
                            "versions": [v.describe() for v in m.versions.values()]}
                           for name, m in self._models.items()]}

    def version_state(self, model: str, version: str) -> ModelVersion:
        return self._version(self._model(model), version)

    async def close(self, timeout: float) -> None:
        """Stop every owned engine (server shutdown)."""
        if self._starting is not None:
            await self._starting  # its engines exist once it returns, so they are stopped below
        for task in list(self._tasks):
            task.cancel()
        loop = asyncio.get_running_loop()
        engines = [v.engine for m in self._models.values() for v in m.versions.values() if v.owned and v.engine]
        await asyncio.gather(*(loop.run_in_executor(None, e.shutdown, timeout) for e in engines))

    # -- internals --------------------------------------------------------------------------

    def _model(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            raise UnknownModel(model)
        return m

    def _version(self, m: _Model, version: str) -> ModelVersion:
        entry = m.versions.get(version)
        if entry is None:
            raise UnknownVersion(f"model '{m.config.name}' has no version '{version}' "
                                 f"(known: {', '.join(m.versions) or 'none'})")
        return entry

    def _create(self, m: _Model, version: VersionConfig, beside_serving: bool) -> ModelVersion:
        """Memory check, then build and start the engine (it loads on its own thread)."""
        model_config = self._config.model_config_of(m.config.name, version)
        source = version.path or f"random:{version.random_config}(seed {version.seed})"
        est = None
        if self._check_memory:
            try:
                est = self._memory.estimate(model_config, m.config.batching.max_batch_size)
            except (OSError, ValueError, KeyError) as exc:
                raise LifecycleError(f"cannot read version '{version.version}' of model '{m.config.name}' "
                                     f"from {source}: {exc}") from None
            memory.check_fits(f"version '{version.version}' of model '{m.config.name}'", est,
                              self._config.validation.memory_headroom)
        pacer = LoadPacer(self._serving_engines) if beside_serving else None
        engine = self._build_engine(model_config, m.config.batching, pacer)
        entry = ModelVersion(m.config.name, version.version, source, engine,
                             self._build_service(m.config.name, version, engine),
                             estimate=est, pacer=pacer, health=self._health())
        m.versions[version.version] = entry
        engine.start()
        self._event(m.config.name, version.version, "loading", source=source)
        return entry

    async def _validate(self, m: _Model, entry: ModelVersion) -> None:
        still_counted = [entry]

        def settled() -> None:
            """Count the load out once: before ``ready`` or ``failed`` is visible, or when cancelled."""
            if still_counted:
                still_counted.clear()
                if entry.pacer is not None:
                    entry.pacer.stop()  # validated or failed: its steps no longer yield
                self._loading(-1)

        try:
            await self._load_and_validate(m, entry, settled)
        finally:
            settled()

    async def _load_and_validate(self, m: _Model, entry: ModelVersion, settled: Callable[[], None]) -> None:
        try:
            engine = entry.engine
            assert engine is not None
            cfg = self._config.validation
            deadline = time.monotonic() + cfg.timeout_s
            while not engine.ready:
                if engine.failure is not None:
                    raise RuntimeError(f"load failed: {engine.failure}")
                if time.monotonic() > deadline or entry.state != "loading":
                    raise RuntimeError(f"not loaded within {cfg.timeout_s:g}s" if entry.state == "loading"
                                       else f"{entry.state} while loading")
                await asyncio.sleep(0.05)
            entry.state = "validating"
            self._event(m.config.name, entry.version, "validating")
            active = m.active.engine if m.active is not None else None
            result = await validate(engine, active, list(m.recent), cfg)
            entry.validation = result
            if entry.state != "validating":
                return
            if not result.ok:
                raise RuntimeError(f"validation failed: {result.reason}")
            settled()
            entry.state = "ready"
            self._event(m.config.name, entry.version, "validated", **result.describe())
            if entry.activate_when_valid:
                self.activate(m.config.name, entry.version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the version is marked failed with the reason
            if entry.state in ("draining", "unloaded"):
                return
            settled()
            entry.state = "failed"
            entry.error = str(exc)
            log.warning("model %s: version %s failed: %s", m.config.name, entry.version, exc)
            self._event(m.config.name, entry.version, "failed", error=str(exc))
            await self._shutdown(entry, "failed")

    def _loading(self, delta: int) -> None:
        """Count a version's load in (+1) or out (-1): the switch interval is lowered while any loads or
        validates (its engine's first steps, the probe and the shadow run share the GIL with serving)."""
        if delta > 0 and self._loads == 0:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_interval, LOADING_SWITCH_INTERVAL_S))
        self._loads += delta
        if delta < 0 and self._loads == 0:
            sys.setswitchinterval(self._switch_interval)

    def _serving_engines(self) -> list[LifecycleEngine]:
        """The engines that serve live requests now (active versions and canaries; any thread: a loading
        engine's pacer calls it; the event loop may change the versions meanwhile, which raises
        RuntimeError, and the pacer then does not wait)."""
        return [v.engine for m in list(self._models.values()) for v in list(m.versions.values())
                if v.state in ("active", "ready") and v.engine is not None and v.engine.ready]

    def _release(self, entry: ModelVersion) -> None:
        entry.leases -= 1
        if entry.leases == 0 and entry.state == "draining":
            self._retire(entry)

    def _retire(self, entry: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._shutdown(entry, "unloaded"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, entry: ModelVersion, final: VersionState) -> None:
        engine, entry.engine, entry.service = entry.engine, None, None
        if engine is not None and entry.owned:
            await asyncio.get_running_loop().run_in_executor(None, _free, engine,
                                                             self._config.limits.drain_timeout_s)
        if final == "unloaded":
            entry.state = "unloaded"
            self._event(entry.model, entry.version, "unloaded")
            log.info("model %s: version %s unloaded", entry.model, entry.version)

    def _health(self) -> HealthWindow:
        return HealthWindow(self._config.rollback.window_s)

    def _event(self, model: str, version: str, event: str, **details: Any) -> None:
        self.events.append({"time": time.time(), "model": model, "version": version, "event": event, **details})


def _free(engine: LifecycleEngine, timeout: float) -> None:
    """Stop the engine thread. Its memory goes back to torch's caching allocator when the caller
    drops the engine; the next load reuses it (``memory.free_bytes`` counts it as free). Neither
    ``gc.collect`` nor ``torch.cuda.empty_cache`` here, as there used to be: both ran while the new
    version served, the first holding the GIL for its whole walk of the heap, the second a
    device-wide sync (cudaFree) under the allocator's lock. The version's objects were frozen at
    its start-up (a collection could not reach them), and the fused decoder's tensors are freed
    by reference counting."""
    engine.shutdown(timeout)
