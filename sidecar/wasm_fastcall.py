"""Cheaper calls into OPA's Wasm exports: wasmtime's unchecked call instead of ``Func.__call__``.

In: an ``opapywasm.OpaWasmPolicy``. Out: the same policy, whose instances call the OPA ABI
exports (``opa_eval``, ``opa_malloc``, ``opa_heap_ptr_get/set``, ...: all i32 in, i32 out)
through ``wasmtime_func_call_unchecked`` with a preallocated raw-value array.

Why: wasmtime-py's ``Func.__call__`` rebuilds the function's type and converts every argument
through ``Val`` on each call, ~25 µs a call on this project's 2-core VMs, 1.3 µs unchecked;
a decision makes five such calls, and that overhead was most of an in-process check.
The signatures are checked once, when an instance is built: an export whose type is not all
i32 keeps wasmtime's checked call. Traps still raise (wasmtime-py's ``enter_wasm`` guard,
inlined). This reaches into two private attributes of opa-py-wasm 1.2 (the pool's factory and the
runtime's export table); ``accelerate`` returns False and changes nothing when they are absent.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import wasmtime
from opapywasm import UNDEFINED
from wasmtime import _ffi as ffi
from wasmtime._func import maybe_raise_last_exn

from common import strict_json

log = logging.getLogger("kernelgate.authz.wasm")


class _UncheckedFunc(wasmtime.Func):
    """A Func of i32 params and at most one i32 result, called without per-call type checks."""

    def __init__(self, func: wasmtime.Func, n_params: int, n_results: int) -> None:  # no super(): same handle
        self._func = func._func
        self._n_results = n_results
        self._slots = ffi.wasmtime_val_raw_t * max(n_params, n_results, 1)
        self._n = max(n_params, n_results, 1)

    def __call__(self, store: Any, *params: int) -> Any:
        raw = self._slots()
        for i, value in enumerate(params):
            raw[i].i32 = value
        # wasmtime-py's enter_wasm, inlined (a generator-based context manager per call otherwise):
        # a trap raises Trap, an error WasmtimeError, either after an exception a host function
        # (an OPA builtin in Python) left behind
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        try:
            error = _call_unchecked(store._context(), ctypes.byref(self._func), raw, self._n, ctypes.byref(trap))
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
            if trap:
                trapped = wasmtime.Trap._from_ptr(trap)
                maybe_raise_last_exn()
                raise trapped
        except wasmtime.WasmtimeError:
            maybe_raise_last_exn()
            raise
        return raw[0].i32 if self._n_results else None


def _unchecked(store: Any, item: Any) -> Any:
    if not isinstance(item, wasmtime.Func):
        return item
    ty = item.type(store)
    params, results = ty.params, ty.results
    i32 = wasmtime.ValType.i32()
    if len(results) > 1 or any(t != i32 for t in [*params, *results]):
        return item
    return _UncheckedFunc(item, len(params), len(results))


class _Exports(Mapping):
    """The runtime's export table with i32 functions swapped for unchecked ones (built lazily)."""

    def __init__(self, exports: Any, store: Any) -> None:
        self._exports, self._store, self._cache = exports, store, {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = _unchecked(self._store, self._exports[name])
        return self._cache[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._exports))

    def __len__(self) -> int:
        return len(dict(self._exports))


def accelerate(policy: Any) -> bool:
    """Make every instance ``policy`` builds from now on use unchecked export calls."""
    pool = getattr(policy, "_pool", None)
    factory = getattr(pool, "_factory", None)
    if factory is None:
        log.warning("opa-py-wasm's internals changed: policy evaluation keeps wasmtime's checked calls")
        return False

    def build(*args: Any, **kwargs: Any) -> Any:
        instance = factory(*args, **kwargs)
        runtime = getattr(instance, "_runtime", None)
        if runtime is not None and hasattr(runtime, "_exports") and hasattr(runtime, "store"):
            runtime._exports = _Exports(runtime._exports, runtime.store)
        return instance

    pool._factory = build
    return True


# Epoch ticks per evaluation deadline. opa-py-wasm's ticker thread wakes every 10 ms whatever
# the deadline (100 wake-ups a second, each taking the GIL from the event loop: ~25 µs of a check's
# CPU at 800 checks/s, bench/gate_profile.py); a deadline needs only a few ticks.
TICKS_PER_DEADLINE = 8


def coarsen_epoch(policy: Any, timeout_s: float) -> float | None:
    """Tick ``policy``'s epoch ticker every ``timeout_s / TICKS_PER_DEADLINE`` (at least opa-py-wasm's
    10 ms): instances built from now on get a deadline of ``TICKS_PER_DEADLINE`` ticks, i.e. an
    evaluation is interrupted after 7/8 to 8/8 of ``timeout_s`` (with 10 ms ticks: after
    timeout_s - 10 ms to timeout_s). Returns the tick, or None where opa-py-wasm's internals differ
    (its 10 ms tick stays)."""
    epoch = getattr(getattr(policy, "_factory", None), "epoch", None)
    if epoch is None or not hasattr(epoch, "tick_seconds"):
        log.warning("opa-py-wasm's internals changed: its epoch ticker keeps its own tick")
        return None
    epoch.tick_seconds = max(epoch.tick_seconds, timeout_s / TICKS_PER_DEADLINE)
    return epoch.tick_seconds


# --- one opa_eval call per evaluation ------------------------------------------------------------
_libc = ctypes.CDLL(None)
_memchr = _libc.memchr
_memchr.restype = ctypes.c_void_p
_memchr.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
_PAGE = 65536


def _raw(name: str, restype: Any) -> Any:
    """A fresh ctypes handle on a wasmtime C function (wasmtime-py's own keeps its restype)."""
    func = ffi.dll._FuncPtr((name, ffi.dll))
    func.restype = restype
    func.argtypes = (ctypes.POINTER(ffi.wasmtime_context_t), ctypes.POINTER(ffi.wasmtime_memory_t))
    return func


_call_unchecked = ffi.wasmtime_func_call_unchecked
# the memory's base address as an int and its size: no pointer object and cast per call
_memory_base = _raw("wasmtime_memory_data", ctypes.c_void_p)
_memory_size = _raw("wasmtime_memory_data_size", ctypes.c_size_t)
_set_epoch_deadline = ffi.wasmtime_context_set_epoch_deadline  # (store context, ticks after the current)


class LeanEvaluationError(RuntimeError):
    """The evaluation failed (trap, deadline, bad result); the instance was dropped and is rebuilt."""


class LeanEvaluator:
    """OPA's own SDKs' evaluation path (npm-opa-wasm ``evaluate`` on ABI >= 1.2): one instance held
    for good, the input JSON copied to the heap checkpoint right past the data with one memmove,
    one ``opa_eval(0, entrypoint, data, input, len, input + len, 0)`` export call (it starts its
    own heap at the given pointer, so nothing is reset around it), the NUL-terminated result read
    with one bounded ``memchr`` and one copy.

    In: a policy built by opa-py-wasm (imports, builtins, data loaded, epoch ticker) and JSON bytes.
    Out: the decision (``result_set[0]["result"]``) or ``UNDEFINED``. Not thread-safe: the sidecar
    evaluates on its event-loop thread only. opa-py-wasm's ``evaluate`` around the same export
    call costs ~5 export calls, a pool borrow, a bytearray copy in and a chunked read out.
    A failure after entering Wasm (a trap, the epoch deadline) drops the instance: the next
    evaluation builds a fresh one, as opa-py-wasm's pool does with a poisoned instance.
    Uses two private members of opa-py-wasm 1.2 (``_build_instance``, the instance's runtime,
    data manager and evaluator); ``LeanEvaluator.supported`` says whether they are there.
    """

    def __init__(self, policy: Any, entrypoint: str) -> None:
        self._policy = policy
        self._entrypoint = policy.entrypoints[entrypoint]
        config = policy._config
        self._max_input = config.max_input_bytes
        self._max_result = config.max_result_bytes
        self._instance: Any = None

    @staticmethod
    def supported(policy: Any) -> bool:
        return callable(getattr(policy, "_build_instance", None)) and hasattr(policy, "_config")

    def _take(self) -> None:
        instance = self._policy._build_instance()
        try:
            runtime, data = instance._runtime, instance._data
            store = runtime.store
            func = _unchecked(store, runtime.get_func("opa_eval"))
            self._store, self._memory, self._eval = store, runtime.memory, func
            # (store context, memory handle): stable for the instance's life, which holds both
            self._where = (store._context(), ctypes.byref(runtime.memory._memory))
            self._data_addr, self._heap = data.data_addr, data.data_heap_ptr
            self._ticks = instance._evaluator._deadline_ticks
        except BaseException:
            instance.close()
            raise
        self._instance = instance

    def close(self) -> None:
        if self._instance is not None:
            self._instance.close()
            self._instance = None

    def evaluate(self, raw: bytes) -> Any:
        if self._instance is None:
            self._take()
        n = len(raw)
        if n > self._max_input:
            raise LeanEvaluationError(f"input of {n} bytes exceeds max_input_bytes {self._max_input}")
        store, memory, addr, where = self._store, self._memory, self._heap, self._where
        try:
            size = _memory_size(*where)
            if addr + n > size:
                memory.grow(store, (addr + n - size + _PAGE - 1) // _PAGE)
            ctypes.memmove(_memory_base(*where) + addr, raw, n)
            if self._ticks is not None:
                _set_epoch_deadline(where[0], self._ticks)
            result = self._eval(store, 0, self._entrypoint, self._data_addr, addr, n, addr + n, 0)
            base = _memory_base(*where)  # the evaluation may have grown (moved) the memory
            size = _memory_size(*where)
            if not 0 < result < size:
                raise LeanEvaluationError(f"opa_eval returned an invalid address {result}")
            end = _memchr(base + result, 0, min(self._max_result + 1, size - result))
            if not end:
                raise LeanEvaluationError(f"no result within max_result_bytes {self._max_result}")
            text = ctypes.string_at(base + result, end - base - result)
        except BaseException as exc:
            self.close()  # guest state unknown: a fresh instance next time
            if isinstance(exc, LeanEvaluationError):
                raise
            if isinstance(exc, wasmtime.Trap) and "wasm trap: interrupt" in str(exc):
                raise LeanEvaluationError("evaluation exceeded its time limit (opa.timeout_s) "
                                          "and was interrupted") from None
            raise LeanEvaluationError(f"evaluation failed: {exc}") from exc
        try:
            result_set = orjson.loads(text)
        except orjson.JSONDecodeError:  # integers beyond 64 bits: the slower decoder takes them
            result_set = strict_json.loads(text)
        if not result_set:
            return UNDEFINED
        if isinstance(result_set, list) and isinstance(result_set[0], dict) and "result" in result_set[0]:
            return result_set[0]["result"]
        raise LeanEvaluationError(f"policy returned an unexpected result shape: {text[:200]!r}")
