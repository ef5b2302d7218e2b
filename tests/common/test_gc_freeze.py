import gc
import weakref

from common.gc_freeze import freeze_startup_objects


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def test_startup_objects_leave_the_collector_and_garbage_does_not_leak():
    survivor = Node()
    garbage = Node()
    garbage.peer = garbage  # a cycle: only the cyclic collector can free it
    garbage_ref = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_startup_objects()
        assert frozen > 0
        # start-up garbage was collected before the freeze, so freezing did not keep it alive
        assert garbage_ref() is None
        # the survivor is frozen: later collections (which walk gc.get_objects()) skip it
        assert all(o is not survivor for o in gc.get_objects())
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    assert any(o is survivor for o in gc.get_objects())


def test_a_start_up_beside_serving_threads_collects_only_the_young_generations():
    """``full=False`` (a model version loaded while the server serves): the young generations are
    collected, the old one is not walked (that walk holds the GIL), then everything is frozen."""
    generations: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            generations.append(info["generation"])

    young = Node()
    young.peer = young
    young_ref = weakref.ref(young)
    del young
    gc.callbacks.append(seen)
    try:
        frozen = freeze_startup_objects(full=False)
        assert generations == [1]
        assert young_ref() is None  # a fresh cycle is still in a young generation: collected
        assert frozen is None and gc.get_freeze_count() > 0  # frozen, not counted (a walk of all of them)
        generations.clear()
        freeze_startup_objects()
        assert generations == [2]
    finally:
        gc.callbacks.remove(seen)
        gc.unfreeze()
