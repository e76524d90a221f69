"""Many users on one base model: isolation, exactness against per-user backprop, routing, modes."""
from __future__ import annotations

from users_helpers import build_users as build_users  # test_backends.py imports it from here

