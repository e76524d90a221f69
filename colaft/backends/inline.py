"""`inline`: the owners live in the server's process and fit when their messages arrive."""
from __future__ import annotations

from colaft.backends.base import Message, Reply, Worker, register_backend
from colaft.users import Owner


@register_backend("inline")
class InlineBackend:
    """Owners in this process, on `device` (a torch device; None: where the server's adapters are).

    A fit runs inside `submit`, so the server waits for it: staleness buys nothing here.
    With `delayed`, every reply is held until the pipeline has to wait for it, so the server
    runs exactly S steps ahead, the most staleness S allows, deterministically: a way to
    study staleness without workers. (A remote backend with one user and S = 1 does exactly
    the same, since no fit is back before the settle that follows its push; with more users
    or S >= 2, replies that are back early are applied early.)
    """

    recoverable = False
    transfer_seconds = 0.0  # nothing is serialised: owners get the server's tensors

    def __init__(self, device: str | None = None, delayed: bool = False):
        self.device, self.delayed = device, delayed
        self.worker = Worker()
        self._replies: list[Reply] = []

    def add(self, owner: Owner) -> None:
        self.worker.add(owner)

    def remove(self, user: str) -> None:
        self.worker.remove(user)

    def submit(self, msg: Message) -> None:
        self._replies.append(self.worker.handle(msg))

    def replies(self, block: bool) -> list[Reply]:
        if self.delayed:  # only what the pipeline waits for: the oldest reply
            return [self._replies.pop(0)] if block and self._replies else []
        out, self._replies = self._replies, []
        return out

    def call(self, msg: Message):
        return self.worker.handle(msg)

    def owner(self, user: str) -> Owner:
        """The live owner of `user` (inline only: elsewhere owners live in other processes)."""
        return self.worker.owners[user]

    def close(self) -> None:
        self.worker.owners.clear()
