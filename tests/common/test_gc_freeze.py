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
