"""colaft.routing: the rows of a mixed batch go through their own users' adapters."""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, randomize_
from users_helpers import assignment, batch_of, k_users, rows

# ---------------------------------------------------------------- a model's forward and generate, routed

@pytest.mark.parametrize("arch", list(ARCHS))
def test_routed_forward_equals_each_users_forward(arch):
    cm = k_users(arch, 4)
    batch = batch_of(arch, 3, 9)
    batch.pop("labels")
    users = assignment(4, 9, seed=3)
    cm.eval()
    with torch.no_grad():
        mixed = cm(**batch, users=users).logits
        for user in cm.users:
            mine = [i for i, u in enumerate(users) if u == user]
            alone = cm(**rows(batch, mine), users=[user] * len(mine)).logits
            torch.testing.assert_close(mixed[mine], alone, rtol=1e-5, atol=1e-6)


def test_generation_routes_rows_to_their_users():
    cm = k_users("llama", 2, kinds=[dict(adapter="lowrank", rank=4)])
    with torch.no_grad():  # make the users' adapters differ a lot, so the users' texts differ
        for j, a in enumerate(cm.user_adapters("user.1").values()):
            randomize_(a, std=1.0, seed=j)
    prompt = torch.tensor([[5, 6, 7], [5, 6, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = cm.generate(input_ids=prompt, users=["user.0", "user.1"], **kw)
    each = [cm.generate(input_ids=prompt[:1], users=[u], **kw)[0] for u in ["user.0", "user.1"]]
    assert torch.equal(both[0], each[0]) and torch.equal(both[1], each[1])
    assert not torch.equal(each[0], each[1])
    beams = cm.generate(input_ids=prompt, users=["user.0", "user.1"], num_beams=2, **kw)  # rows repeat per beam
    assert beams.shape == both.shape


def test_lowrank_rows_run_batched_not_per_user(monkeypatch):
    """Low-rank users of a mixed batch share one batched call per site (no per-user loop)."""
    from colaft.adapters.lowrank import LowRankLinear
    cm = k_users("llama", 8, kinds=[dict(adapter="lowrank", rank=4), dict(adapter="lowrank", rank=8)])
    calls = []
    original = LowRankLinear.grouped
    monkeypatch.setattr(LowRankLinear, "grouped", staticmethod(lambda *a: calls.append(1) or original(*a)))
    monkeypatch.setattr(LowRankLinear, "forward", lambda *a: pytest.fail("a per-user lowrank forward ran"))
    batch = batch_of("llama", 0, 16)
    cm(**batch, users=assignment(8, 16, seed=0))
    linear_sites = sum(isinstance(s.get("user.0"), LowRankLinear) for s in cm.sites.values())
    assert len(calls) == linear_sites
