"""Models with many users for the tests: mixed adapter types at the same sites, and batches
whose rows belong to users.

Imported by name (tests/ is on sys.path): `from users_helpers import build_users, ...`.
"""
from __future__ import annotations

import torch
from conftest import ARCHS, flat_state, image_batch, randomize_, text_batch

from colaft import ColaConfig, ColaModel

# users cycle through these adapter settings: mixed types and sizes at the same sites
KINDS = [dict(adapter="lowrank", rank=8), dict(adapter="linear"), dict(adapter="mlp", hidden=8),
         dict(adapter="lowrank", rank=4, alpha=6.0)]  # scale 1.5: rounding differs with where it applies
# free-form ids: dots, slashes, spaces, unicode, a case-only clash, names of root files, PEFT's "lora_" prefix
IDS = ["user.0", "a/b c", "ünï", "User.0", "colaft_users.json", "..", "a"]
LOWRANK = [dict(adapter="lowrank", rank=8), dict(adapter="lowrank", rank=4, alpha=4.0),
           dict(adapter="lowrank", rank=2, alpha=8.0)]


def users_of(k: int) -> list[str]:
    return [f"user.{i}" for i in range(k)]  # a dot too: ids are free-form


def build_users(arch: str, users: list[str], kinds=KINDS, seed: int = 0) -> ColaModel:
    """`users` on a fresh base, adapter settings cycling through `kinds`, every adapter randomised (distinct)."""
    factory, targets, _ = ARCHS[arch]
    cm = None
    for i, user in enumerate(users):
        config = ColaConfig(target_modules=targets, **kinds[i % len(kinds)])
        if cm is None:
            cm = ColaModel(factory(), config, user=user)
        else:
            cm.add_user(user, config)
        for j, adapter in enumerate(cm.user_adapters(user).values()):
            randomize_(adapter, seed=seed + 100 * i + j)
    return cm


def k_users(arch: str, k: int, kinds=KINDS) -> ColaModel:
    """A model with the `k` users user.0 ... user.{k-1} of mixed adapter types."""
    return build_users(arch, users_of(k), kinds)


def users_model(arch: str, ids: list[str], kinds=KINDS, seed: int = 0) -> ColaModel:
    """`build_users` in eval mode: the model of many users that the checkpoint tests save and load."""
    return build_users(arch, ids, kinds, seed).eval()


def batch_of(arch: str, seed: int, rows: int) -> dict:
    kind = ARCHS[arch][2]
    if kind == "image":
        return image_batch(seed, rows)
    lengths = [3 + (seed + i) % 4 for i in range(rows)]  # mixed lengths: padding differs by row
    return text_batch(seed, kind, lengths)


def rows(batch: dict, index: list[int]) -> dict:
    return {k: v[index] for k, v in batch.items()}


def assignment(k: int, n: int, seed: int) -> list[str]:
    """Every user of `users_of(k)` gets rows, interleaved in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    users = [users_of(k)[i % k] for i in range(n)]
    return [users[i] for i in torch.randperm(n, generator=g).tolist()]


def mixed(arch: str, users: list[str], seed: int = 5) -> tuple[dict, list[str]]:
    """A batch whose rows belong to `users`, shuffled (every user has rows)."""
    n = 2 * len(users)
    batch = batch_of(arch, seed, n)
    g = torch.Generator().manual_seed(seed)
    return batch, [users[i % len(users)] for i in torch.randperm(n, generator=g).tolist()]


def logits(cm, batch: dict, users: list[str] | None = None, **kw) -> torch.Tensor:
    """The model's logits on `batch` without its labels, rows routed to `users` when given."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return cm(**batch, users=users, **kw).logits if users is not None else cm(**batch, **kw).logits


def same_users(a: ColaModel, b: ColaModel) -> None:
    """Same users in the same order, configs, mode, weights, and bit-equal adapters."""
    assert a.users == b.users and a.user_configs == b.user_configs
    assert (a.mode, a.weights) == (b.mode, b.weights)
    for u in a.users:
        sa, sb = flat_state(a.user_adapters(u)), flat_state(b.user_adapters(u))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), u


def assert_one_block_per_user(packets) -> None:
    """Every user's packets view one storage that holds that user's tensors and nothing else
    (each aligned to 64 bytes): a transport that moves storages sends exactly its rows, once."""
    from colaft.packets import tensor_key
    for user in {p.user for p in packets}:
        mine = [p for p in packets if p.user == user]
        storages = {t.untyped_storage().data_ptr() for p in mine for t in (p.x, p.grad)}
        assert len(storages) == 1, f"{user}: {len(storages)} storages"
        distinct = {tensor_key(t): t for p in mine for t in (p.x, p.grad)}
        held = sum(-(-t.numel() * t.element_size() // 64) * 64 for t in distinct.values())
        assert mine[0].x.untyped_storage().nbytes() == held
