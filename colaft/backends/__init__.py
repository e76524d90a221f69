"""Where the owners' fits run: one small interface (colaft.backends.base), one file per backend.

    inline   in the server's process, on any torch device
    process  local worker processes (torch.multiprocessing; tensors through shared memory)
    ray      Ray actors, on this machine or an existing cluster (tensors through the object store)

Adding a backend means one new file that calls `register_backend`, imported here.
"""
from colaft.backends import inline, process, ray
from colaft.backends.base import (
                                  BACKENDS,
                                  Backend,
                                  Message,
                                  Reply,
                                  Worker,
                                  WorkerError,
                                  WorkerLost,
                                  describe,
                                  make_backend,
                                  register_backend,
)

BUILT_IN = (inline, process, ray)  # imported for their registration (ray itself only when used)
__all__ = ["BACKENDS", "BUILT_IN", "Backend", "Message", "Reply", "Worker", "WorkerError", "WorkerLost", "describe",
           "make_backend", "register_backend"]
