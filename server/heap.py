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
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect once, then take every object now alive out of future collections."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "froze %d long-lived objects out of garbage collection in %.2fs",
        gc.get_freeze_count(),
        time.perf_counter() - started,
    )


def unsettle() -> None:
    """Hand the frozen objects back to the collector."""
    gc.unfreeze()
