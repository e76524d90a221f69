"""colaft.io.state: a trainer's checkpoint resumes training bit for bit (one user and several: adapters,
optimizers, schedulers, buffered packets, the RNG, the mode), and refuses a trainer built otherwise."""
from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import DEVICES, assert_states_equal, batch, tiny
from conftest import ARCHS, flat_state
from users_helpers import KINDS, logits, mixed, users_model

from colaft import ColaConfig, ColaModel, Trainer

# ---------------------------------------------------------------- one user

def make_trainer(device: str = "cpu") -> tuple[ColaModel, dict]:
    # lowrank dropout: the site dropout draws from torch's RNG, so resuming must restore it
    config = ColaConfig(target_modules=["q_proj", "v_proj", "gate_proj"], rank=4, alpha=8, dropout=0.2)
    cola = ColaModel(tiny("llama", device), config)
    return cola, dict(optimizer="adamw", lr=2e-2, weight_decay=0.01, scheduler="linear", warmup_ratio=0.2,
                      total_steps=10)


def run(trainer: Trainer, steps: range) -> list[float]:
    device = next(trainer.model.parameters()).device
    return [trainer.step(batch("llama", i, device)) for i in steps]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interval", [1, 2])
def test_resume_is_bit_exact(tmp_path, interval, device):
    cola, kw = make_trainer(device)
    reference = Trainer(cola, interval=interval, **kw)
    torch.manual_seed(1)
    ref_losses = run(reference, range(10))

    cola, kw = make_trainer(device)
    first = Trainer(cola, interval=interval, **kw)
    torch.manual_seed(1)
    losses = run(first, range(5))
    assert len(first.owner().pending) == (0 if interval == 1 else len(cola.sites))  # one buffered step
    first.save_checkpoint(tmp_path / "ckpt")

    cola, kw = make_trainer(device)  # fresh: new random adapters, RNG moved on
    resumed = Trainer(cola, interval=interval, **kw)
    resumed.load_checkpoint(tmp_path / "ckpt")
    losses += run(resumed, range(5, 10))

    assert losses == ref_losses
    assert_states_equal(resumed.owner_adapters, reference.owner_adapters)
    assert_states_equal(resumed.model.adapters(), reference.model.adapters())
    counts = lambda stats: {k: v for k, v in stats.items() if not k.endswith("_seconds")}
    assert counts(resumed.stats) == counts(reference.stats)  # timings differ run to run
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    for p, q in zip((p for a in resumed.owner_adapters.values() for p in a.parameters()),
                    (p for a in reference.owner_adapters.values() for p in a.parameters())):
        for k, v in reference.optimizer.state[q].items():
            assert torch.equal(resumed.optimizer.state[p][k], v), k

    # the RNG is what made the dropout masks agree: without it the run differs
    cola, kw = make_trainer(device)
    unseeded = Trainer(cola, interval=interval, **kw)
    unseeded.load_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(2)
    assert run(unseeded, range(5, 10)) != ref_losses[5:]


def test_load_checkpoint_refuses_another_config(tmp_path):
    cola, kw = make_trainer()
    trainer = Trainer(cola, interval=2, **kw)
    run(trainer, range(1))
    trainer.save_checkpoint(tmp_path / "ckpt")
    cola = ColaModel(tiny("llama"), ColaConfig(target_modules=["q_proj", "v_proj", "gate_proj"], rank=4, alpha=16,
                                               dropout=0.2))
    with pytest.raises(ValueError, match=r"another ColaConfig .*'alpha': \(8.0, 16.0\)"):
        Trainer(cola, **kw).load_checkpoint(tmp_path / "ckpt")
    cola, kw = make_trainer()
    with pytest.raises(ValueError, match="holds 1 pending server steps, but this trainer fits every 1"):
        Trainer(cola, interval=1, **kw).load_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- every user

def trainer_of(seed: int) -> Trainer:
    # dropout: the sites draw from torch's RNG, so resuming must restore it
    kinds = [{**k, "dropout": 0.1} for k in KINDS[:3]]
    cm = users_model("llama", ["user.0", "a/b", "ünï"], kinds=kinds, seed=seed)
    return Trainer(cm.train(), optimizer="adamw", lr=2e-2, weight_decay=0.01, scheduler="linear",
                   warmup_ratio=0.2, total_steps=10, interval=2)


def train(trainer: Trainer, steps: range) -> list[float]:
    users = trainer.model.users
    out = []
    for i in steps:
        batch, order = mixed("llama", users, seed=i)
        out.append(trainer.step(batch, users=order))
    return out


def assert_nested_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}/{i}")
    elif hasattr(a, "__dataclass_fields__"):  # packets
        assert_nested_equal(vars(a), vars(b), where)
    else:
        assert a == b, where


def test_resume_of_three_users_is_bit_exact(tmp_path):
    reference = trainer_of(seed=0)
    torch.manual_seed(1)
    ref_losses = train(reference, range(10))

    first = trainer_of(seed=0)
    torch.manual_seed(1)
    losses = train(first, range(5))
    assert all(first.owner_state(u)["pending_steps"] == 1 for u in first.model.users)  # one buffered step each
    first.save_checkpoint(tmp_path / "ckpt")

    resumed = trainer_of(seed=50)  # other adapters; the RNG moved on
    torch.manual_seed(2)
    resumed.load_checkpoint(tmp_path / "ckpt")
    losses += train(resumed, range(5, 10))

    assert losses == ref_losses
    for user in reference.model.users:
        assert_nested_equal(resumed.owner_state(user), reference.owner_state(user), user)
        ref, got = flat_state(reference.model.user_adapters(user)), flat_state(resumed.model.user_adapters(user))
        assert all(torch.equal(got[k], v) for k, v in ref.items()), user
    counts = lambda stats: {k: v for k, v in stats.items() if not k.endswith("_seconds")}
    assert counts(resumed.stats) == counts(reference.stats)

    # a trainer checkpoint is an adapter checkpoint of every user too
    loaded = ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt")
    assert loaded.users == first.model.users


def test_resume_refuses_other_users(tmp_path):
    trainer = trainer_of(seed=0)
    train(trainer, range(1))
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = trainer_of(seed=0)
    other.remove_user("a/b")
    with pytest.raises(ValueError, match=r"saved for users \['a/b', 'user.0', 'ünï'\], this trainer has"):
        other.load_checkpoint(tmp_path / "ckpt")
    other = trainer_of(seed=0)
    other.model.remove_user("ünï")
    other.model.add_user("ünï", ColaConfig(target_modules=ARCHS["llama"][1], adapter="mlp", hidden=16,
                                           dropout=0.1))
    with pytest.raises(ValueError, match=r"user 'ünï' saved with another ColaConfig .*'hidden': \(8, 16\)"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_resume_restores_the_collaborative_mode(tmp_path):
    def make() -> Trainer:
        return Trainer(users_model("bert", ["user.0", "user.1"], kinds=[KINDS[0], KINDS[1]]), optimizer="sgd", lr=0.1)

    trainer = make()
    trainer.model.set_mode("collaborative", {"user.1": 3.0})
    batch, users = mixed("bert", trainer.model.users)
    trainer.step(batch, users=users)
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert (resumed.model.mode, resumed.model.weights) == ("collaborative", {"user.1": 3.0})
    batch, _ = mixed("bert", trainer.model.users, seed=9)  # every row sees the weighted mean: no users needed
    assert torch.equal(logits(resumed.model.eval(), batch), logits(trainer.model.eval(), batch))


@pytest.mark.parametrize("mode", ["personal", "collaborative"])
def test_a_checkpoint_holds_buffered_packets_that_share_their_input(tmp_path, mode):
    """q, k and v read one input: their buffered packets hold the same x tensor, which safetensors
    refused to store (shared memory) at any checkpoint taken between fits (interval > 1)."""
    def make() -> Trainer:
        config = ColaConfig(target_modules=["q_proj", "k_proj", "v_proj"], rank=4, alpha=8)
        cola = ColaModel(tiny("llama", "cpu"), config)
        if mode == "collaborative":
            cola.set_mode("collaborative")
        return Trainer(cola, interval=3, optimizer="adamw", lr=2e-2)

    def unpadded(i: int) -> dict:  # no padding: every packet is a flat view of its site's x, not a copy
        b = batch("llama", i)
        return {"input_ids": b["input_ids"], "labels": b["input_ids"]}

    torch.manual_seed(1)
    reference = make()
    ref_losses = [reference.step(unpadded(i)) for i in range(6)]
    torch.manual_seed(1)
    first = make()
    losses = [first.step(unpadded(i)) for i in range(4)]
    pending = first.owner().pending
    assert len({p.x.untyped_storage().data_ptr() for p in pending}) < len(pending)  # shared inputs
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "ckpt")
    losses += [resumed.step(unpadded(i)) for i in range(4, 6)]
    assert losses == ref_losses
    assert_states_equal(resumed.model.adapters(), reference.model.adapters())
