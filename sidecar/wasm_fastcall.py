"""Cheaper calls into OPA's Wasm exports: wasmtime's unchecked call instead of ``Func.__call__``.

In: an ``opapywasm.OpaWasmPolicy``. Out: the same policy, whose instances call the OPA ABI
exports (``opa_eval``, ``opa_malloc``, ``opa_heap_ptr_get/set``, ...: all i32 in, i32 out)
through ``wasmtime_func_call_unchecked`` with a preallocated raw-value array.

Why: wasmtime-py's ``Func.__call__`` rebuilds the function's type and converts every argument
through ``Val`` on each call, ~25 µs a call on this project's 2-core VMs, 1.3 µs unchecked;
a decision makes five such calls, and that overhead was most of an in-process check.
The signatures are checked once, when an instance is built: an export whose type is not all
i32 keeps wasmtime's checked call. Traps still raise (the same ``enter_wasm`` guard wasmtime
uses). This reaches into two private attributes of opa-py-wasm 1.2 (the pool's factory and the
runtime's export table); ``accelerate`` returns False and changes nothing when they are absent.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._func import enter_wasm

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
        with enter_wasm(store) as trap:
            error = ffi.wasmtime_func_call_unchecked(store._context(), ctypes.byref(self._func), raw, self._n, trap)
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
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
