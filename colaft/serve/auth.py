"""API keys: one or more per user, shown once, stored only as a SHA-256 hash.

A key is 32 random bytes (URL-safe base64) behind the prefix "sk-colaft-": with that much
entropy a plain hash cannot be reversed by guessing, so no slow password hash is needed,
and looking a key up is one indexed query. Requests carry it as `Authorization: Bearer KEY`,
and nowhere else: a URL lands in logs and histories.

The server keeps the keys it has checked in memory for a few seconds (`KeyCache`), so that a
request with a known key (or a key just refused) costs no database query and no thread: a
flood of requests past a quota is refused on the event loop alone, and never queues the
other users' requests behind its key checks. A key rotated by `colaft users rotate-key` is
refused by a running server within `KEY_CACHE_SECONDS`.

A user name is 1 to 64 ASCII letters, digits and `._@-` (NAME), so it prints as itself on one
line anywhere; a name an older server stored outside that set prints escaped (`shown`).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import threading
import time

import anyio.to_thread
from cachetools import TTLCache
from sqlalchemy import select

from colaft.serve.db import Database, User, new_id

PREFIX = "sk-colaft-"
NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
NAME_RULE = "1 to 64 ASCII letters, digits, '.', '_', '@' or '-'"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_user(db: Database, name: str) -> tuple[User, str]:
    """A new user named `name` and its API key (returned once, never stored)."""
    name = name.strip()
    if not NAME.fullmatch(name):
        raise ValueError(f"user name {name!r} refused: a name is {NAME_RULE}")
    key = PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        if s.scalar(select(User).where(User.name == name)) is not None:
            raise ValueError(f"user {name!r} already exists")
        user = User(id=new_id("user"), name=name, key_hash=hash_key(key))
        s.add(user)
    return user, key


def rotate_key(db: Database, name: str) -> str:
    """A new key for `name`; the old one stops working at once."""
    key = PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise ValueError(f"no user {name!r}")
        user.key_hash = hash_key(key)
    return key


def shown(name: str) -> str:
    """`name` to print: itself when it is in NAME's set, else quoted with its control and
    non-ASCII characters escaped, so that no name can break or forge a line of output."""
    return name if NAME.fullmatch(name) else ascii(name)


def list_users(db: Database) -> list[User]:
    with db.read() as s:
        return list(s.scalars(select(User).order_by(User.created_at, User.name)))


KEY_CACHE_SECONDS = 2.0
"""How long a running server trusts what it last read of a key (a rotated key works that long)."""


class KeyCache:
    """key hash -> the User (or None: no such key), as the database said at most `ttl` seconds
    ago; the `size` most recent keys (unknown ones too, so made-up keys cost one query per
    `ttl` each, not one per request).

    The keys missing from memory are asked of the database together, one query at a time: the
    keys asked for while a query runs wait for the next, which takes them all. After a lull
    every key has expired, and the first burst (64 users' first requests, 200 long polls of
    one key) used to take one handler thread and one query per request, every other request
    queued behind them: the slowest answers under `colaft bench serve --abuse`.
    """

    def __init__(self, db: Database, ttl: float = KEY_CACHE_SECONDS, size: int = 65536, timer=None):
        self.db = db
        self._cache: TTLCache = TTLCache(size, ttl, timer=timer or time.monotonic)
        self._lock = threading.Lock()  # TTLCache is not thread-safe; held for dict operations only
        # event loop only: key hash -> the answer its request waits for
        self._next: dict[str, asyncio.Future] = {}  # for the next query
        self._asked: dict[str, asyncio.Future] = {}  # in the query under way
        self._asking: asyncio.Future | None = None

    def cached(self, key_hash: str) -> tuple[bool, User | None]:
        """(known, user): known False when the database must be asked (`user`, `lookup`)."""
        with self._lock:
            try:
                return True, self._cache[key_hash]
            except KeyError:
                return False, None

    async def user(self, key_hash: str) -> User | None:
        """The key's user: from memory, else from the database with the other keys asked meanwhile."""
        known, user = self.cached(key_hash)
        if known:
            return user
        answer = self._asked.get(key_hash) or self._next.get(key_hash)
        if answer is None:
            answer = self._next[key_hash] = asyncio.get_running_loop().create_future()
            if self._asking is None or self._asking.done():
                self._asking = asyncio.ensure_future(self._ask())
        return await asyncio.shield(answer)  # a waiter that gives up (its client left) cancels no one else's

    async def _ask(self) -> None:
        while self._next:
            self._asked, self._next = self._next, {}
            try:
                users = await anyio.to_thread.run_sync(self.lookup, list(self._asked))
            except Exception as e:  # noqa: BLE001 - every waiter fails as its own query would have
                for answer in self._asked.values():
                    answer.set_exception(e)
            else:
                for key_hash, answer in self._asked.items():
                    answer.set_result(users[key_hash])
            self._asked = {}

    def lookup(self, key_hashes: list[str]) -> dict[str, User | None]:
        """The database's answers (a query: call it off the event loop), remembered."""
        users = self.db.users_by_key_hash(key_hashes)
        found = {key_hash: users.get(key_hash) for key_hash in key_hashes}
        with self._lock:
            self._cache.update(found)
        return found


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None
