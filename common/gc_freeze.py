"""Keep start-up objects out of the cyclic garbage collector's way.

A full (generation 2) collection walks every tracked object. After start-up a process
holds ~140 000 of them in the sidecar (grpc, protobuf, Wasm runtime, policy data) and far
more in the inference server (model, tokenizer); walking them stalls the event loop or the
engine thread for ~90 ms (measured in the sidecar on the 2-core dev box), which shows up
as the p99 of every check in flight. Objects that live as long as the process never become
garbage, so after start-up they are collected once and then frozen (``gc.freeze``): later
collections only walk what was created since. Reference counting still frees frozen objects.
"""

from __future__ import annotations

import gc


def freeze_startup_objects(full: bool = True) -> int | None:
    """Collect start-up garbage, then freeze everything left; returns how many objects are frozen
    (None with ``full=False``: counting walks every frozen object with the GIL held, ~56 ms for the
    ~330 000 of an inference server on the dev box, and ``gc.freeze`` itself is a list splice).

    ``full=False`` collects only the young generations (0 and 1) before freezing: for start-up
    work done while the process already serves (a model version loaded beside serving ones),
    where a full collection would hold the GIL for its whole walk and stall the threads that
    serve. Cyclic garbage that already reached the old generation is then frozen with the rest
    (it stays allocated); keep what such a start-up drops free of cycles (reference counting
    frees it), or collect it fully in a quiet moment."""
    gc.collect(2 if full else 1)
    gc.freeze()
    return gc.get_freeze_count() if full else None
