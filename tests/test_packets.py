"""colaft.packets: bytes per server step, what the packets cost on the wire, against the analytic
count rows x (d_in + d_out) x bytes per element, summed over the sites; their safetensors form;
which packets are finite."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import LENGTHS, image_batch, text_batch, tiny_cnn, tiny_gpt2, tiny_llama
from torch import nn

from colaft import ColaConfig, ColaModel, Packet, Trainer, server_step
from colaft.packets import all_finite, cast_packets, packets_from_bytes, packets_nbytes, packets_to_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_bytes_per_step(dtype):
    model = tiny_gpt2().to(dtype)
    cfg = model.config
    d, layers = cfg.n_embd, cfg.n_layer
    batch = text_batch(0)
    rows = int(batch["attention_mask"].sum())  # padding dropped
    assert rows == sum(LENGTHS) == 18
    # per block: c_attn d -> 3d, attn.c_proj d -> d, mlp.c_fc d -> 4d, mlp.c_proj 4d -> d
    per_row = layers * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    size = torch.finfo(dtype).bits // 8
    analytic = rows * per_row * size
    assert analytic == {torch.float32: 36864, torch.bfloat16: 18432}[dtype]

    cm = ColaModel(model, ColaConfig(target_modules=["c_attn", "c_proj", "c_fc"]))
    trainer = Trainer(cm, "adamw", lr=1e-3)
    trainer.step(batch)
    assert trainer.stats["packet_bytes"] == analytic
    packets = server_step(cm, batch).packets
    assert sum(p.nbytes for p in packets) == analytic and len(packets) == 8
    wire = packets_to_bytes(packets)
    header = int.from_bytes(wire[:8], "little")
    assert len(wire) == 8 + header + analytic  # safetensors: the tensors' bytes plus a JSON header
    back = packets_from_bytes(wire)
    assert [p.site for p in back] == [p.site for p in packets]
    assert all(torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad) and a.x.dtype == b.x.dtype
               for a, b in zip(back, packets))
    print(f"tiny GPT-2 (d={d}, {layers} blocks, 4 sites/block), {rows} tokens, {dtype}: "
          f"{analytic} bytes/step = {per_row * size} bytes/token")


def test_embedding_and_conv_bytes():
    """Token ids travel as int64 (8 bytes a row); a Conv2d site sends whole feature maps."""
    model = tiny_llama()
    d = model.config.hidden_size
    batch = text_batch(1)
    rows = int(batch["attention_mask"].sum())
    cm = ColaModel(model, ColaConfig(target_modules=["embed_tokens", "q_proj"]))
    packets = server_step(cm, batch).packets
    q_out = model.config.num_attention_heads * model.config.head_dim
    analytic = rows * (8 + 4 * d) + 2 * rows * (d + q_out) * 4
    assert sum(p.nbytes for p in packets) == analytic == 18 * 72 + 2 * 18 * 32 * 4

    cm = ColaModel(tiny_cnn(), ColaConfig(target_modules=["conv1", "conv2"]))
    batch = image_batch(0, n=4)
    packets = server_step(cm, batch).packets
    # conv1: (4, 2, 6, 6) -> (4, 4, 6, 6); conv2: (4, 4, 6, 6) -> (4, 6, 3, 3)
    analytic = 4 * ((2 * 36 + 4 * 36) + (4 * 36 + 6 * 9)) * 4
    assert sum(p.nbytes for p in packets) == analytic == 6624


# ---------------------------------------------------------------- finite packets

def test_integer_token_packets_are_finite():
    p = Packet("s", torch.tensor([1, 2, 3]), torch.zeros(3, 5))
    assert p.is_finite()
    p.grad[0, 0] = float("inf")
    assert not p.is_finite()


# ---------------------------------------------------------------- the wire form, users and casts

def test_packets_round_trip_with_their_users_order_and_dtypes():
    g = torch.Generator().manual_seed(0)
    packets = [Packet("model.embed_tokens", torch.tensor([3, 1, 4]), torch.randn(3, 5, generator=g), "a/b c"),
               Packet("q_proj", torch.randn(3, 6, generator=g).bfloat16(), torch.randn(3, 4, generator=g).bfloat16(),
                      "ünï"),
               Packet("q_proj", torch.randn(2, 6, generator=g), torch.randn(2, 4, generator=g))]  # the default user
    back = packets_from_bytes(packets_to_bytes(packets))
    assert [(p.site, p.user) for p in back] == [("model.embed_tokens", "a/b c"), ("q_proj", "ünï"),
                                                ("q_proj", "default")]
    for a, b in zip(back, packets):
        assert a.x.dtype == b.x.dtype and a.grad.dtype == b.grad.dtype
        assert torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad)
    assert packets_from_bytes(packets_to_bytes([])) == []


def test_a_cast_packet_keeps_token_ids_whole():
    ids = Packet("emb", torch.tensor([[1, 2]]), torch.randn(2, 4), "ann")
    rows = Packet("lin", torch.randn(2, 6), torch.randn(2, 4), "ann")
    small = [p.to(dtype=torch.bfloat16) for p in (ids, rows)]
    assert small[0].x.dtype == torch.int64 and torch.equal(small[0].x, ids.x)
    assert small[1].x.dtype == small[0].grad.dtype == small[1].grad.dtype == torch.bfloat16
    assert [(p.site, p.user) for p in small] == [("emb", "ann"), ("lin", "ann")]
    assert small[1].nbytes == rows.nbytes // 2 and ids.nbytes == 2 * 8 + 8 * 4
    assert rows.to("cpu").x.dtype == torch.float32  # a move alone keeps the dtype
    assert all_finite([]) and all_finite([ids, rows])


def test_packets_that_share_a_tensor_round_trip():
    """Sites fed by one input (q, k, v) record the same x; safetensors refuses shared memory."""
    x, rows = torch.randn(4, 6), torch.randn(8, 6)
    packets = [Packet("q_proj", x, torch.randn(4, 2)), Packet("k_proj", x, torch.randn(4, 2)),
               Packet("v_proj", rows[:4], torch.randn(4, 2)), Packet("v_proj", rows[4:], torch.randn(4, 2))]
    back = packets_from_bytes(packets_to_bytes(packets))
    for a, b in zip(back, packets):
        assert torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad)


def test_packets_viewing_one_block_round_trip_and_overlapping_views_are_copied(monkeypatch):
    """A user's packets view one block (the server's): written as they are, none copied. Views
    whose memory overlaps (safetensors refuses them) are copied, and still round-trip."""
    block = torch.randn(64)
    packets = [Packet("a", block[:12].view(3, 4), block[12:18].view(3, 2)),
               Packet("b", block[32:44].view(3, 4), block[48:54].view(3, 2))]
    overlapping = [Packet("c", block[:12].view(3, 4), block[4:10].view(3, 2))]
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t) or clone(t, *a, **k))
    back = packets_from_bytes(packets_to_bytes(packets))
    assert clones == []
    back += packets_from_bytes(packets_to_bytes(overlapping))
    assert len(clones) == 1
    for a, b in zip(back, packets + overlapping):
        assert torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad)


# ---------------------------------------------------------------- sites that read one input share its x

LLAMA_SITES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _llama_x(packets: list[Packet], user: str = "default") -> dict[str, list[torch.Tensor]]:
    """layer -> the x of its 7 sites, in LLAMA_SITES order."""
    x = {p.site.split("layers.")[1]: p.x for p in packets if p.user == user}
    return {layer: [x[f"{layer}.{s}"] for s in LLAMA_SITES] for layer in ("0", "1")}


def test_sites_that_read_one_input_share_one_x():
    """q, k, v read one hidden state, gate and up another: their packets hold one x object, cut
    once from the padded batch; o_proj and down_proj read their own. The bytes count each x once."""
    cm = ColaModel(tiny_llama(), ColaConfig(target_modules="all-linear"))
    batch = text_batch(0)
    packets = server_step(cm, batch).packets
    assert len(packets) == 14
    xs = _llama_x(packets)
    for q, k, v, o, gate, up, down in xs.values():
        assert q is k is v and gate is up
        assert len({id(t) for t in (q, o, gate, down)}) == 4
    assert xs["0"][0] is not xs["1"][0]
    rows, d, kv, ff = 18, 16, 8, 32  # real tokens (padding dropped); hidden, k/v width, MLP width
    x_once = d + d + d + ff  # q/k/v's input, o's, gate/up's, down's
    grads = d + kv + kv + d + ff + ff + d
    assert packets_nbytes(packets) == 2 * rows * (x_once + grads) * 4 == 29952
    assert sum(p.nbytes for p in packets) == 2 * rows * ((3 * d + d + 2 * d + ff) + grads) * 4 == 36864

    trainer = Trainer(cm, "adamw", lr=1e-3)
    trainer.step(batch)
    assert trainer.stats["packet_bytes"] == 29952  # as sent, each shared x once
    small = Trainer(ColaModel(tiny_llama(), ColaConfig(target_modules="all-linear")), "adamw", lr=1e-3,
                    transfer_dtype=torch.bfloat16)
    small.step(batch)
    assert small.stats["packet_bytes"] == 29952 // 2


def test_a_shared_x_is_sent_once_and_arrives_shared():
    cm = ColaModel(tiny_llama(), ColaConfig(target_modules="all-linear"))
    packets = server_step(cm, text_batch(1)).packets
    for wire in (packets, cast_packets(packets, torch.bfloat16)):
        data = packets_to_bytes(wire)
        header = int.from_bytes(data[:8], "little")
        assert len(data) == 8 + header + packets_nbytes(wire)
        back = packets_from_bytes(data)
        assert [(p.site, p.user) for p in back] == [(p.site, p.user) for p in wire]
        assert all(torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad) for a, b in zip(back, wire))
        for q, k, v, o, gate, up, down in _llama_x(back).values():
            assert q is k is v and gate is up and q is not o and gate is not down
            assert q.dtype == wire[0].x.dtype


def test_a_malformed_input_index_is_refused():
    x = torch.randn(2, 3)
    data = packets_to_bytes([Packet("a", x, torch.randn(2, 1)), Packet("b", x, torch.randn(2, 1))])
    bad = data.replace(b'[0, 0]', b'[1, 1]')  # the second packet's x was never stored
    assert bad != data
    with pytest.raises(ValueError, match="inputs"):
        packets_from_bytes(bad)


def test_each_users_sites_share_only_that_users_rows():
    cm = ColaModel(tiny_llama(), ColaConfig(target_modules="all-linear"), user="ann")
    cm.add_user("bob")
    users = ["ann", "bob", "bob", "ann"]
    packets = server_step(cm, text_batch(2), users=users).packets
    ann, bob = _llama_x(packets, "ann"), _llama_x(packets, "bob")
    for layer in ann:
        for xs, rows in ((ann[layer], 6 + 5), (bob[layer], 4 + 3)):
            q, k, v, o, gate, up, down = xs
            assert q is k is v and gate is up and len(q) == rows
        assert ann[layer][0] is not bob[layer][0]


def test_sites_with_different_inputs_do_not_share():
    """Dropout on the adapters' input gives every site its own x."""
    cm = ColaModel(tiny_llama(), ColaConfig(target_modules="all-linear", dropout=0.3))
    cm.train()
    packets = server_step(cm, text_batch(0)).packets
    assert len({id(p.x) for p in packets}) == len(packets) == 14
    assert packets_nbytes(packets) == sum(p.nbytes for p in packets)


class _TwoReaders(nn.Module):
    """Two linear layers on one input; only one ignores the padded positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = nn.Embedding(40, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.emb(input_ids)  # (B, T, 8)
        a = self.a(h) * attention_mask[..., None]  # dL/da = 0 at padding: those rows are dropped
        return SimpleNamespace(loss=a.sum() + self.b(h).pow(2).sum())  # dL/db is not


def test_sites_that_keep_different_rows_keep_their_own():
    """One input, different kept rows: each site's packet keeps exactly its own rows (as before
    inputs were shared), so the two do not share x."""
    batch = text_batch(0)
    cm = ColaModel(_TwoReaders(), ColaConfig(target_modules=["a", "b"]))
    a, b = server_step(cm, batch).packets
    assert (a.site, b.site) == ("a", "b")
    assert len(a.x) == int(batch["attention_mask"].sum()) == 18 and len(b.x) == batch["input_ids"].numel()
    assert a.x is not b.x
    h = cm.model.emb(batch["input_ids"]).reshape(-1, 8)
    assert torch.equal(b.x, h) and torch.equal(a.x, h[batch["attention_mask"].reshape(-1).bool()])
