"""Garbage collection that never stops the server for long.

CPython's full collection walks every tracked object with the GIL held, so every thread of the
server - the event loop answering /health included - stands still meanwhile. A serving process
holds some 550,000 tracked objects once its libraries are imported (a full collection of them:
150-300 ms of CPU on a 2-core VM), and under `colaft bench serve --abuse` the server ran one
every few seconds: the slowest answers of /health and job status fell on them. So:

    at startup                    collect, then freeze: what lives now is never walked again
    after every full collection   freeze its survivors: the next walks only newer objects
    every `reclaim_seconds`       unfreeze and collect everything once: an object frozen while
                                  alive that later dies in a reference cycle is freed then
                                  (objects without cycles are freed by reference counting anyway)
"""
from __future__ import annotations

import gc
import threading

RECLAIM_SECONDS = 600.0


class Heap:
    def __init__(self, reclaim_seconds: float = RECLAIM_SECONDS):
        self.reclaim_seconds = reclaim_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.reclaim()
        gc.callbacks.append(self._after)
        self._thread = threading.Thread(target=self._every, name="colaft-heap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._after in gc.callbacks:
            gc.callbacks.remove(self._after)
        gc.unfreeze()  # a process that goes on (tests) collects as usual again

    def reclaim(self) -> None:
        """Collect everything, frozen objects too, and freeze what is left."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _after(self, phase: str, info: dict) -> None:
        # the young generations are empty after a full collection: every object still tracked survived it
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    def _every(self) -> None:
        while not self._stop.wait(self.reclaim_seconds):
            self.reclaim()
