"""colaft.packets: bytes per server step, what the packets cost on the wire, against the analytic
count rows x (d_in + d_out) x bytes per element, summed over the sites; their safetensors form;
which packets are finite."""
from __future__ import annotations

import pytest
import torch
from conftest import LENGTHS, image_batch, text_batch, tiny_cnn, tiny_gpt2, tiny_llama

from colaft import ColaConfig, ColaModel, Packet, Trainer, server_step
from colaft.packets import all_finite, packets_from_bytes, packets_to_bytes


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
