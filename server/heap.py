"""Keep CPython's cyclic garbage collector away from the server's index.

At 550,000 pods the index is millions of long-lived references (the pods by key, by node and
by namespace; their grants), and the collector's full collections walk every container the
process holds: measured in the server scale bench, 0.4 to 1.2 s each, with the event loop
stopped meanwhile — a gap in every watch and node stream; one fell in most 10,000-event watch
bursts, a fifth to a third of the server's time for the burst. Nothing in the index is ever
part of a reference cycle (records are immutable structs of strings, freed by reference
counting when replaced or deleted), so there is nothing there for the collector to find.

``settle`` runs once, when the initial sync is complete: one full collection, then
``gc.freeze()``, which moves every object then alive out of the collector's generations. Objects
made later are collected as usual; the cost is that cyclic garbage among the frozen objects is
not reclaimed while they stay frozen (the collection just before freezing leaves none then).
``unsettle``, when the server stops, hands them back, for processes that go on afterwards (the
tests run many servers in one process).

After the freeze the young generation is collected far less often (every 20,000 allocations
net, not 700): a watch event allocates a few dozen short-lived objects, almost all freed by
reference counting, and the collections in between were about 3 µs of every event (the server
scale bench, 10,000 events) while finding next to nothing. ``unsettle`` restores the thresholds.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# gc.set_threshold after the freeze: young generation, then how many young collections make a
# middle one, and middle ones an old one (CPython's defaults are 700, 10, 10).
SETTLED_THRESHOLDS = (20_000, 20, 100)
_thresholds: tuple[int, int, int] | None = None  # what settle replaced


def settle() -> None:
    """Collect once, then take every object now alive out of future collections."""
    started = time.perf_counter()
    global _thresholds
    gc.collect()
    gc.freeze()
    if _thresholds is None:
        _thresholds = gc.get_threshold()
    gc.set_threshold(*SETTLED_THRESHOLDS)
    log.info(
        "froze %d long-lived objects out of garbage collection in %.2fs",
        gc.get_freeze_count(),
        time.perf_counter() - started,
    )


def unsettle() -> None:
    """Hand the frozen objects back to the collector, with its thresholds as they were."""
    global _thresholds
    gc.unfreeze()
    if _thresholds is not None:
        gc.set_threshold(*_thresholds)
        _thresholds = None
