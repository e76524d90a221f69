"""The process backend's shared-memory transport: identity and aliasing kept, buffers reused."""
from __future__ import annotations

import torch

from colaft.backends.shm import Incoming, Outgoing


def test_shm_round_trip_keeps_identity_aliasing_and_reuses_buffers():
    out, inc = Outgoing(), Incoming()
    x = torch.randn(10, 4)
    w = torch.nn.Parameter(torch.randn(3, 3))
    obj = {"a": x, "view": x[2:5, 1:], "again": x, "w": w, "ws": [w], "ids": torch.arange(5), "none": None}
    packed = out.pack(obj)
    assert packed.shared is not None and packed.nbytes >= x.numel() * 4  # x's storage once, not three times
    got = inc.unpack(packed)
    assert got["a"] is got["again"] and got["w"] is got["ws"][0]  # one object each, as pickle would keep
    assert isinstance(got["w"], torch.nn.Parameter) and got["w"].requires_grad
    assert torch.equal(got["view"], x[2:5, 1:]) and got["view"].data_ptr() - got["a"].data_ptr() == (2 * 4 + 1) * 4
    assert torch.equal(got["ids"], obj["ids"]) and got["ids"].dtype == torch.int64
    got["a"].add_(1)  # a private copy: the sender's tensor and the buffer are untouched
    assert torch.equal(obj["a"], x) and not torch.equal(got["a"], x)
    out.release(packed.buffer)
    again = out.pack(obj)
    assert again.buffer == packed.buffer and again.shared is None  # reused, and the receiver has it mapped
    out.release(again.buffer)
    bigger = out.pack(torch.randn(4096))
    assert bigger.buffer != packed.buffer and bigger.forget == [packed.buffer]  # outgrown: dropped on both sides
    inc.unpack(bigger)
    assert list(inc.buffers) == [bigger.buffer]
    assert out.pack({"no": "tensors"}).buffer is None


def test_the_next_message_never_waits_for_the_previous_buffer():
    """While the receiver still reads message n (staleness 1: the worker is busy with a fit),
    message n+1 goes into a second buffer; once both are in use they alternate and no new
    shared memory is made (its page faults are the costly part)."""
    out = Outgoing()
    x = torch.randn(1000)
    first = out.pack([x])
    second = out.pack([x])  # the first not yet released
    assert second.buffer != first.buffer
    held = [first.buffer, second.buffer]
    for _ in range(6):
        out.release(held.pop(0))
        packed = out.pack([x])
        assert packed.buffer not in held and packed.shared is None  # one of the two, already mapped there
        held.append(packed.buffer)
    assert set(out.buffers) == {first.buffer, second.buffer}
