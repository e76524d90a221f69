"""colaft.io.tensors: nested states (state_dicts, optimizer and scheduler states) as JSON plus named
tensors, without pickle; an owner's whole state as bytes, and nothing else read back as one."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from colaft import FitConfig, Owner, Packet
from colaft.io.tensors import decode, encode, state_from_bytes, state_to_bytes


def assert_same(got, want, where: str = "") -> None:
    """Equal values of the same types all the way down (a tuple stays a tuple, an int key an int;
    a state_dict's OrderedDict comes back a dict)."""
    kind = dict if isinstance(want, dict) else type(want)
    assert type(got) is kind, (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want, where


def round_trip(obj):
    """`obj` through JSON text and safetensors bytes, as a checkpoint stores it."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode(obj, "", tensors))
    return decode(json.loads(text), load(save(tensors))), tensors


def test_nested_states_round_trip_with_their_types():
    g = torch.Generator().manual_seed(0)
    obj = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, generator=g)},
                     1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, generator=g).bfloat16()}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False, "foreach": None,
                             "name": "ünï"}],
           "ids": torch.tensor([1, 2, 3]), "mask": torch.tensor([True, False]), "empty": {}, "nothing": []}
    back, tensors = round_trip(obj)
    assert_same(back, obj)
    # each tensor is named by its path; int keys (an optimizer's) survive JSON's string keys
    assert sorted(tensors) == ["ids", "mask", "state/0/exp_avg", "state/0/step", "state/1/exp_avg", "state/1/step"]


def test_an_optimizer_resumes_exactly_from_its_stored_state():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1.0)
    state, _ = round_trip(opt.state_dict())
    twin_opt.load_state_dict(state)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("obj,message", [
    ({"a": object()}, "a: a object cannot be stored without pickle"),
    ({"a": [1, {2, 3}]}, "a/1: a set cannot be stored without pickle"),
    ({"m": nn.Linear(2, 2)}, "m: a Linear cannot be stored without pickle"),
    ({"a": {1.5: 1}}, "a: only str and int keys can be stored"),
    ({"a": {(1, 2): 1}}, "a: only str and int keys can be stored"),
])
def test_encode_refuses_what_only_pickle_could_store(obj, message):
    with pytest.raises(TypeError, match=message):
        encode(obj, "", {})


def test_encode_refuses_two_tensors_under_one_name():
    with pytest.raises(ValueError, match="two tensors would both be stored as 'a/b'"):
        encode({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}, "", {})


# ---------------------------------------------------------------- an owner's state as bytes

def owner(interval: int = 1) -> Owner:
    torch.manual_seed(0)
    config = FitConfig(optimizer="adamw", lr=1e-2, scheduler="linear", warmup_ratio=0.5, total_steps=8,
                       interval=interval)
    return Owner("ann", {"site": nn.Linear(6, 5)}, config)


def packets(seed: int) -> list[Packet]:
    g = torch.Generator().manual_seed(seed)
    return [Packet("site", torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g), "ann")]


def test_an_owner_state_travels_as_bytes_and_resumes_exactly():
    first = owner()
    first.push(packets(0))
    data = state_to_bytes(first.state(), {"version": 1, "seq": 7})
    state, meta = state_from_bytes(data)
    assert meta == {"version": 1, "seq": 7}
    assert state["pending"] == [] and state["pending_steps"] == 0 and state["version"] == 1
    want = first.state()
    assert_same({k: v for k, v in state.items() if k != "pending"}, {k: v for k, v in want.items() if k != "pending"})
    assert len(load(data)) > 0  # plain safetensors: its tensors load without running code

    second = owner()
    second.load_state(state)
    a, b = first.push(packets(1)), second.push(packets(1))
    assert (a.version, a.lr) == (b.version, b.lr) == (2, first.lr)
    assert_same(b.states, a.states)


def test_a_state_with_buffered_packets_does_not_travel_as_state():
    buffering = owner(interval=2)
    assert buffering.push(packets(0)) is None
    with pytest.raises(ValueError, match="a state with buffered packets does not travel this way"):
        state_to_bytes(buffering.state())


@pytest.mark.parametrize("data", [
    b"",
    b"not safetensors at all",
    state_to_bytes(owner().state())[:-3],  # truncated
    save({"x": torch.zeros(2)}),  # safetensors, no state in its header
    save({"x": torch.zeros(2)}, metadata={"state": "{not json", "meta": "{}"}),
])
def test_state_from_bytes_refuses_what_is_not_an_owner_state(data):
    with pytest.raises(ValueError, match="not an owner state: "):
        state_from_bytes(data)


@pytest.mark.parametrize("state", [
    {"version": 1},
    {"adapters": {}, "optimizer": {}, "scheduler": {}},  # no version
    {"adapters": {}, "optimizer": {}, "scheduler": {}, "version": 0, "pending_steps": 1},  # buffered steps
])
def test_state_from_bytes_refuses_a_state_without_an_owners_fields(state):
    tensors: dict[str, torch.Tensor] = {}
    data = save(tensors, metadata={"state": json.dumps(encode(state, "", tensors)), "meta": "{}"})
    with pytest.raises(ValueError, match="not an owner state without buffered packets"):
        state_from_bytes(data)
