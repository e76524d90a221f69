"""API keys: one or more per user, shown once, stored only as a SHA-256 hash.

A key is 32 random bytes (URL-safe base64) behind the prefix "sk-colaft-": with that much
entropy a plain hash cannot be reversed by guessing, so no slow password hash is needed,
and looking a key up is one indexed query. Requests carry it as `Authorization: Bearer KEY`,
and nowhere else: a URL lands in logs and histories.

A user name is 1 to 64 ASCII letters, digits and `._@-` (NAME), so it prints as itself on one
line anywhere; a name an older server stored outside that set prints escaped (`shown`).
"""
from __future__ import annotations

import hashlib
import re
import secrets

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


def authenticate(db: Database, header: str | None) -> User | None:
    """The user whose key the `Authorization` header carries, or None."""
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return db.user_by_key_hash(hash_key(key.strip()))
