"""`inline`: the owners live in the server's process and fit when their messages arrive."""
from __future__ import annotations

from colaft.backends import Message, Reply, Worker, register_backend
from colaft.users import Owner


@register_backend("inline")
class InlineBackend:
    """Owners in this process, on `device` (a torch device; None: where the server's adapters are).

    A fit runs inside `submit`, so the server waits for it: staleness buys nothing here.
    """

    recoverable = False
    transfer_seconds = 0.0  # nothing is serialised: owners get the server's tensors

    def __init__(self, device: str | None = None):
        self.device = device
        self.worker = Worker()
        self._replies: list[Reply] = []

    def add(self, owner: Owner) -> None:
        self.worker.add(owner)

    def remove(self, user: str) -> None:
        self.worker.remove(user)

    def submit(self, msg: Message) -> None:
        self._replies.append(self.worker.handle(msg))

    def replies(self, block: bool) -> list[Reply]:
        out, self._replies = self._replies, []
        return out

    def call(self, msg: Message):
        return self.worker.handle(msg)

    def owner(self, user: str) -> Owner:
        """The live owner of `user` (inline only: elsewhere owners live in other processes)."""
        return self.worker.owners[user]

    def close(self) -> None:
        self.worker.owners.clear()
