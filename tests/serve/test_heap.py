"""Garbage collection while serving (colaft.serve.heap): the objects alive at startup and the
survivors of each full collection are never walked again, so no collection stops the server for
long; a periodic reclaim still frees what died in a reference cycle after it was frozen."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

from fastapi.testclient import TestClient

from colaft.serve.api import create_app
from colaft.serve.db import Database
from colaft.serve.heap import Heap
from colaft.serve.routes.common import Service
from colaft.serve.settings import Settings


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_the_server_freezes_its_heap_while_it_serves_and_lets_go_after(tmp_path: Path):
    """A full collection of a server's imported libraries takes 150-300 ms of CPU with the GIL
    held; frozen, they are never walked. The old server never froze anything."""
    app = create_app(Service(Settings(tmp_path), Database(f"sqlite:///{tmp_path / 'colaft.db'}"), {}, 1 << 20, 0))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() > 100_000  # torch, transformers, fastapi, sqlalchemy, ...
        gc.collect()
        assert len(gc.get_objects()) < 1000  # a full collection's survivors are frozen too (a few newer may be left)
    assert gc.get_freeze_count() == 0


def test_survivors_of_a_full_collection_are_frozen_and_a_reclaim_frees_cycles_that_died_since():
    heap = Heap(reclaim_seconds=3600)
    heap.start()
    try:
        node = Node()
        ref = weakref.ref(node)
        gc.collect()
        assert not any(o is node for o in gc.get_objects())  # frozen: no collection walks it
        del node
        gc.collect()
        assert ref() is not None  # died frozen: left until the reclaim
        heap.reclaim()
        assert ref() is None
    finally:
        heap.stop()
    assert gc.get_freeze_count() == 0 and gc.callbacks.count(heap._after) == 0
