"""podiam-server with two probes inside its process, for bench/gc_pauses.py: every pass of the
cyclic garbage collector (``gc.callbacks``: generation, when, how long) and the event loop's
lag (a task sleeping 10 ms, its oversleep), written once a second as JSON lines to the file
named by PODIAM_GC_PROBE; once the server has stopped (and unfrozen the heap), how many
objects one more ``gc.collect()`` finds.

    python -m bench.gc_probe <podiam-server flags>
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time

from server.__main__ import main as server_main

_collections: list[list] = []
_started = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _collections.append([info["generation"], time.time(), time.perf_counter() - _started[0]])


async def _lag(out) -> None:
    lags, flushed = [], time.monotonic()
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - before - 0.01)
        if time.monotonic() - flushed >= 1.0:
            line = {"t": time.time(), "lag_max": max(lags), "gc": _collections[:],
                    "frozen": gc.get_freeze_count()}  # fmt: skip
            _collections.clear()
            lags.clear()
            out.write(json.dumps(line) + "\n")
            out.flush()
            flushed = time.monotonic()


class _Policy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, out) -> None:
        super().__init__()
        self._out = out

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.call_soon(lambda: setattr(self, "_probe", loop.create_task(_lag(self._out))))
        return loop


def main() -> int:
    with open(os.environ["PODIAM_GC_PROBE"], "a") as out:
        gc.callbacks.append(_timed)
        asyncio.set_event_loop_policy(_Policy(out))
        code = server_main(sys.argv[1:])
        gc.callbacks.remove(_timed)
        out.write(json.dumps({"final_collect": gc.collect(), "t": time.time()}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
