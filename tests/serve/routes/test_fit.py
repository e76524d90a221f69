"""The client-fit routes' own checks (colaft.serve.routes.fit), without a server: an update body
that is not an owner's state at an integer version is a 400 naming the body, never a 500."""
from __future__ import annotations

import pytest
import torch

from colaft.io.tensors import state_to_bytes
from colaft.serve.fits import Channel
from colaft.serve.routes.common import APIError
from colaft.serve.routes.fit import _take_update


def _state(version) -> dict:
    return {"adapters": {"s": {"w": torch.zeros(2, 2)}}, "optimizer": {}, "scheduler": {}, "version": version,
            "pending": [], "pending_steps": 0}


@pytest.mark.parametrize("meta, version", [
    ({"version": float("inf"), "seq": 1}, 1),  # JSON's Infinity: int() overflows (was a 500)
    ({"version": 1, "seq": float("-inf")}, 1),
    ({"version": float("nan"), "seq": 1}, 1),
    ({"version": [1], "seq": 1}, 1),
    ({"version": 1, "seq": 1}, "x"),  # the state's own version, read by the channel (was a 500)
    ({"version": 1, "seq": 1}, float("inf")),
    ({"version": 1, "seq": 1}, None),
])
def test_an_update_whose_numbers_are_not_integers_is_a_400(meta, version):
    channel = Channel("job", interval=1, staleness=0, state=_state(0), seq=0, info={}, wake=lambda: None)
    channel.offer("push", [])
    with pytest.raises(APIError) as e:
        _take_update(channel, "job", state_to_bytes(_state(version), meta))
    assert (e.value.status, e.value.param, e.value.code) == (400, "body", "invalid_update"), e.value.message
    assert channel.version == 0  # nothing taken
    _take_update(channel, "job", state_to_bytes(_state(1), {"version": 1, "seq": 1}))
    assert channel.version == 1
