"""Packets streamed to host memory during the backward (`server_step(stream_packets=True)`):
the same bits as the ordinary step, shared inputs still shared, users' rows still their own,
and never more copies under way than allowed. On CPU the "host" copy is a plain copy, which
runs the very hooks a CUDA server runs."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, make_batch, randomize_
from torch import nn
from users_helpers import assert_one_block_per_user, k_users, mixed

from colaft import ColaConfig, ColaModel, Trainer, server
from colaft.packets import tensor_key
from colaft.server import HostCopies, server_step


def _step(cm, batch, users=None, **kw):
    torch.manual_seed(0)  # the same dropout masks in both steps
    return server_step(cm, batch, users=users, **kw)


def _same_packets(a, b) -> None:
    assert [(p.site, p.user) for p in a] == [(p.site, p.user) for p in b]
    for p, q in zip(a, b):
        for s, t in ((p.x, q.x), (p.grad, q.grad)):
            assert s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t), (p.site, p.user)
    # the same packets share one x: shared inputs (q/k/v) stay shared, nothing else is
    share = [[tensor_key(p.x) == tensor_key(q.x) for q in a] for p in a]
    assert share == [[tensor_key(p.x) == tensor_key(q.x) for q in b] for p in b]


def _model(arch: str) -> ColaModel:
    factory, targets, _ = ARCHS[arch]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets, adapter="mlp", hidden=8))
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.2, seed=i)
    return cm


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("in_flight", [1, 3])
def test_streamed_packets_are_the_same_bits(arch, in_flight):
    """One user, padding dropped (text), q/v (bert, llama) reading one input, an embedding site
    (llama), Conv1D (gpt2), in-place ReLUs on the first site's output (cnn)."""
    cm = _model(arch)
    batch = make_batch(ARCHS[arch][2], 0)
    want = _step(cm, batch).packets
    got = _step(cm, batch, stream_packets=True, in_flight=in_flight).packets
    _same_packets(got, want)
    if arch in ("bert", "llama"):  # the shared input really is shared, as in the ordinary step
        assert len({tensor_key(p.x) for p in got}) < len(got)


@pytest.mark.parametrize("arch", ["llama", "bert", "cnn"])
def test_streamed_packets_of_several_users_hold_their_rows_only(arch):
    cm = k_users(arch, 3)
    batch, users = mixed(arch, cm.users)
    want = _step(cm, batch, users)
    got = _step(cm, batch, users, stream_packets=True, in_flight=2)
    _same_packets(got.packets, want.packets)
    assert got.user_losses == want.user_losses
    assert_one_block_per_user(got.packets)  # copies of each user's rows, in a block of its own


class _Fence:
    def __init__(self, log: list):
        self.done = False
        log.append(self)

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_no_more_copies_under_way_than_allowed(in_flight, monkeypatch):
    """Each copy starts only once fewer than `in_flight` are unfinished; `finish` waits for all."""
    fences: list[_Fence] = []
    busy = []
    to_host = HostCopies._to_host

    def counted(self, t):
        busy.append(sum(not f.done for f in fences))
        return to_host(self, t)

    monkeypatch.setattr(HostCopies, "_fence", lambda self, device: _Fence(fences))
    monkeypatch.setattr(HostCopies, "_to_host", counted)
    cm = k_users("llama", 2)
    batch, users = mixed("llama", cm.users)
    finished = HostCopies.finish
    ends = []

    def finish(self):
        out = finished(self)
        ends.append((self.most_in_flight, all(f.done for f in fences)))
        return out

    monkeypatch.setattr(HostCopies, "finish", finish)
    step = _step(cm, batch, users, stream_packets=True, in_flight=in_flight)
    assert step.packets and len(fences) >= 6
    assert max(busy) == in_flight - 1  # the bound is reached, never passed
    assert ends == [(in_flight, True)]


def test_a_call_holds_its_host_copy_once_its_dl_dh_is_copied(monkeypatch):
    """The hook swaps the call's device x for the host copy as soon as dL/dh there is copied,
    long before the backward ends: the step keeps no reference to the device x."""
    cm = _model("llama")
    batch = make_batch("lm", 0)
    made = []
    init = HostCopies.__init__

    def keep(self, calls, in_flight=4):
        init(self, calls, in_flight)
        made.append((self, [c.x for c in calls]))

    monkeypatch.setattr(HostCopies, "__init__", keep)
    swapped_during_backward = []
    copy_ = HostCopies._copy

    def watched(self, i, grad):
        copy_(self, i, grad)
        swapped_during_backward.append(self.calls[i].x is not made[0][1][i])

    monkeypatch.setattr(HostCopies, "_copy", watched)
    _step(cm, batch, stream_packets=True)
    assert swapped_during_backward and all(swapped_during_backward)
    assert len(swapped_during_backward) == len(made[0][1])


def test_a_site_the_loss_does_not_depend_on_gives_no_packet():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            self.b(x)  # computed, never used
            return self.a(x)

    torch.manual_seed(0)
    cm = ColaModel(Two(), ColaConfig(target_modules=["a", "b"], adapter="linear"))
    loss = lambda out, b: out.square().sum()
    want = server_step(cm, {"x": torch.randn(3, 4)}, loss).packets
    got = server_step(cm, {"x": torch.randn(3, 4)}, loss, stream_packets=True).packets
    assert [p.site for p in got] == [p.site for p in want] == ["a"]


def test_a_streamed_trainer_trains_the_same_bits():
    cm = _model("bert")
    twin = copy.deepcopy(cm)
    a, b = Trainer(cm, "adamw", lr=1e-2), Trainer(twin, "adamw", lr=1e-2, stream_packets=True)
    for step in range(3):
        batch = make_batch("cls", step)
        torch.manual_seed(step)
        la = a.step(batch)
        torch.manual_seed(step)
        assert b.step(batch) == la
    for (k, s), (k2, t) in zip(cm.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(s, t), k


def test_streaming_is_off_on_cpu_by_default(monkeypatch):
    with pytest.raises(ValueError, match="in_flight"):
        HostCopies([], 0)
    monkeypatch.setattr(server.HostCopies, "__init__", lambda *a, **k: pytest.fail("streamed on CPU"))
    cm = _model("gpt2")
    assert server_step(cm, make_batch("lm", 0)).packets
