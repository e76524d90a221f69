"""Encoder-decoder models: T5 and BART, built tiny from configs with random weights.

No pretrained sequence-to-sequence model installs offline, so these are the tests of the
architectures. Batches are right-padded twice: the encoder's input (attention_mask 0) and
the labels (-100). In the decoder the sites' rows are (B, T_dec); when T_dec == T_enc they
have the encoder mask's shape, but the encoder's padding is not theirs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DIM, SEQ, VOCAB, Backprop, flat_state, make_opt, max_rel_err, max_update_rel_err, randomize_
from peft import PeftModel
from references import LR, TOL, PeftTwin, flat_sites
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
from users_helpers import assert_one_block_per_user

from colaft import ColaConfig, ColaModel, Trainer, server_step

PAD, EOS = 0, 2
ENC_LENGTHS = (6, 4, 3, 5)
DEC_LENGTHS = (3, 6, 5, 2)  # rows 0 and 2: real decoder tokens where the encoder is padded


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=DIM, d_kv=8, d_ff=2 * DIM, num_layers=2, num_decoder_layers=2,
                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                   pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    return T5ForConditionalGeneration(cfg)


def tiny_bart() -> BartForConditionalGeneration:
    """With scale_embedding: the token embeddings multiply their output by sqrt(d) (embed_scale)."""
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=DIM, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=2 * DIM, decoder_ffn_dim=2 * DIM,
                     max_position_embeddings=2 * SEQ, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     scale_embedding=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                     decoder_start_token_id=EOS, forced_bos_token_id=None, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg)


# name -> (factory, targets in the encoder and the decoder, token embeddings included)
SEQ2SEQ = {
    "t5": (tiny_t5, ["embed_tokens", "q", "v", "wo"]),  # q, v: self- and cross-attention
    "bart": (tiny_bart, ["embed_tokens", "q_proj", "v_proj", "fc1"]),
}


def seq2seq_batch(seed: int, dec_len: int = SEQ, enc_lengths=ENC_LENGTHS, dec_lengths=DEC_LENGTHS,
                  decoder_mask: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded encoder input and labels; `dec_len == SEQ` gives T_dec == T_enc."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(enc_lengths), SEQ), generator=g)  # (B, T_enc)
    mask = (torch.arange(SEQ) < torch.tensor(enc_lengths)[:, None]).long()  # (B, T_enc)
    labels = torch.randint(3, VOCAB, (len(dec_lengths), dec_len), generator=g)  # (B, T_dec)
    dec_mask = (torch.arange(dec_len) < torch.tensor(dec_lengths).clamp(max=dec_len)[:, None]).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask,
             "labels": labels.masked_fill(dec_mask == 0, -100)}
    if decoder_mask:
        batch["decoder_attention_mask"] = dec_mask
    return batch


def build(arch: str, adapter: str, **kw) -> tuple[ColaModel, torch.nn.Module]:
    """A ColaModel on a tiny model and an untouched copy of that model."""
    factory, targets = SEQ2SEQ[arch]
    base = factory()
    twin = copy.deepcopy(base)
    return ColaModel(base, ColaConfig(target_modules=targets, adapter=adapter, rank=4, alpha=8.0, hidden=8, **kw)), twin


# ---------------------------------------------------------------- padding rows in the decoder

@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_encoder_mask_does_not_drop_decoder_rows(arch):
    """T_dec == T_enc: one SGD step equals backprop, and every decoder token reaches its packets."""
    cm, twin = build(arch, "linear")
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.05, seed=i)
    ref = Backprop(twin, cm.adapters(), make_opt("sgd", 0.5))
    trainer = Trainer(cm, "sgd", lr=0.5)
    batch = seq2seq_batch(0)
    assert trainer.step(batch) == pytest.approx(ref.step(batch), rel=TOL)
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-6


def _reads_encoder(site: str) -> bool:
    """Sites whose tokens are the encoder's: the encoder's own and cross-attention's values."""
    return (site.startswith(("encoder.", "model.encoder."))
            or site.endswith(("EncDecAttention.v", "encoder_attn.v_proj")))


@pytest.mark.parametrize("decoder_mask", [False, True])
@pytest.mark.parametrize("dec_len", [SEQ, 4])
@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_packets_hold_exactly_the_real_tokens(arch, dec_len, decoder_mask):
    """Encoder padding (attention_mask 0) and decoder padding (labels -100, and
    decoder_attention_mask 0 when given) are dropped; every real token is kept, whatever
    the two lengths. Without padding the packets are flat views (no copy)."""
    cm, _ = build(arch, "mlp")
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.2, seed=i)
    batch = seq2seq_batch(0, dec_len, decoder_mask=decoder_mask)
    real = {True: sum(ENC_LENGTHS), False: int((batch["labels"] != -100).sum())}
    packets = server_step(cm, batch).packets
    assert len(packets) == len(cm.sites)
    for p in packets:
        assert len(p.x) == len(p.grad) == real[_reads_encoder(p.site)], p.site
    assert_one_block_per_user(packets)  # rows were selected: copies, in the user's block
    full = seq2seq_batch(0, dec_len, enc_lengths=(SEQ,) * 4, dec_lengths=(dec_len,) * 4, decoder_mask=decoder_mask)
    packets = server_step(cm, full).packets
    for p in packets:
        assert len(p.x) == 4 * (SEQ if _reads_encoder(p.site) else dec_len)
        assert p.x._is_view() and p.grad._is_view(), p.site
    assert len({p.grad.untyped_storage().data_ptr() for p in packets}) == len(packets)  # the calls' own, no block


# ---------------------------------------------------------------- exactness

STEPS = 10


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT: embed_tokens is tied
@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_seq2seq_follows_backprop(arch, optimizer, adapter, report_error):
    """ColA vs PEFT LoRA (lowrank) or plain autograd (linear, mlp), sites in the encoder, the
    decoder and cross-attention, the token embeddings included (BART's scaled by sqrt(d))."""
    cm, twin = build(arch, adapter)
    make_optimizer = make_opt(optimizer, LR[optimizer], weight_decay=0.01)
    if adapter == "lowrank":
        ref = PeftTwin(twin, SEQ2SEQ[arch][1], [], rank=4, alpha=8.0, make_optimizer=make_optimizer)
        cm.load_adapter_state(ref.site_states())  # both start from PEFT's weights
        want = lambda: flat_sites(ref.site_states())
    else:
        for i, a in enumerate(cm.adapters().values()):
            randomize_(a, std=0.05, seed=i)
        ref = Backprop(twin, cm.adapters(), make_optimizer)
        want = lambda: flat_state(ref.adapters)
    trainer = Trainer(cm, optimizer, lr=LR[optimizer], weight_decay=0.01)
    init = flat_state(trainer.owner_adapters)
    assert max_rel_err(init, want()) == 0.0

    # T_dec == T_enc and not, with and without decoder_attention_mask
    batches = [seq2seq_batch(0), seq2seq_batch(1, dec_len=4), seq2seq_batch(2, decoder_mask=True),
               seq2seq_batch(3, dec_len=5, decoder_mask=True)]
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        assert trainer.step(batch) == pytest.approx(ref.step(batch), rel=TOL)

    got, expected = flat_state(trainer.owner_adapters), want()
    err, update_err = max_rel_err(got, expected), max_update_rel_err(got, expected, init)
    report_error(arch, optimizer, adapter, err, update_err)
    assert err <= TOL and update_err <= 1e-3
    assert all((got[k] - init[k]).abs().max() > 0 for k in got)  # every tensor trained
    assert max_rel_err(flat_state(cm.adapters()), got) == 0.0  # the server runs the owner's weights


@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_merged_server_computes_the_unmerged_model(arch):
    """W + delta_W at every site (BART's scaled embeddings included) gives the same logits."""
    cm, _ = build(arch, "lowrank")
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.1, seed=i)
    merged, _ = build(arch, "lowrank", merge=True)
    merged.load_adapter_state({n: a.state_dict() for n, a in cm.adapters().items()})
    batch = seq2seq_batch(0)
    with torch.no_grad():
        want, got = cm(**batch).logits, merged(**batch).logits
        base = cm.unload()(**batch).logits
    assert (want - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_mixed_users_step_equals_each_users_step_alone(arch):
    """Rows of two users (different adapter types) in one padded batch, T_dec == T_enc:
    each user's loss is its mean over its own decoder tokens (not shifted, as a causal LM's)."""
    def two_users():
        cm, twin = build(arch, "lowrank")
        factory, targets = SEQ2SEQ[arch]
        cm.add_user("other", ColaConfig(target_modules=targets, adapter="linear"))
        for i, a in enumerate([a for u in cm.users for a in cm.user_adapters(u).values()]):
            randomize_(a, std=0.05, seed=i)
        return cm, twin

    users = ["default", "other", "other", "default"]
    batch = seq2seq_batch(0)
    cm, twin = two_users()
    mixed = Trainer(cm, "sgd", lr=0.5)
    mixed.step(batch, users=users)
    for user in ("default", "other"):
        mine = [i for i, u in enumerate(users) if u == user]
        alone_cm, _ = two_users()
        alone = Trainer(alone_cm, "sgd", lr=0.5)
        loss = alone.step({k: v[mine] for k, v in batch.items()}, users=[user] * len(mine))
        assert mixed.last_user_losses[user] == pytest.approx(loss, rel=1e-6)
        ref = Backprop(twin, two_users()[0].user_adapters(user), make_opt("sgd", 0.5))
        assert ref.step({k: v[mine] for k, v in batch.items()}) == pytest.approx(loss, rel=1e-6)
        assert max_rel_err(flat_state(mixed.model.user_adapters(user)), flat_state(ref.adapters)) <= 1e-6
        assert max_rel_err(flat_state(alone_cm.user_adapters(user)), flat_state(ref.adapters)) <= 1e-6


# ---------------------------------------------------------------- generation

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)  # a fixed length: rows compare one to one


def trained(arch: str) -> tuple[ColaModel, torch.nn.Module]:
    """A model whose lowrank adapters trained 10 steps (their B factors non-zero), and the base."""
    cm, twin = build(arch, "lowrank")
    trainer = Trainer(cm, "adamw", lr=3e-2)
    for step in range(10):
        trainer.step(seq2seq_batch(step % 4))
    return cm.eval(), twin.eval()


def prompt() -> dict[str, torch.Tensor]:
    batch = seq2seq_batch(7)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}  # padded


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_generation_equals_peft(arch, tmp_path):
    """Greedy and beam search on the trained adapters give PEFT's tokens with the exported adapter."""
    cm, twin = trained(arch)
    with torch.no_grad():
        base = twin.generate(**prompt(), **GEN)
        cm.export_peft(tmp_path)
        peft_model = PeftModel.from_pretrained(twin, tmp_path).eval()
        for beams in (1, 3):
            ours = cm.generate(**prompt(), num_beams=beams, **GEN)
            assert torch.equal(ours, peft_model.generate(**prompt(), num_beams=beams, **GEN)), beams
            if beams == 1:
                assert not torch.equal(ours, base)  # the adapters change what is generated


@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_routed_generation_gives_each_row_its_users_tokens(arch):
    """Rows of three users (lowrank of two ranks, linear) in one generate call: encoder rows
    (B) and decoder rows (B * beams, the beams of a row next to each other) both route."""
    cm, _ = trained(arch)
    targets = SEQ2SEQ[arch][1]
    cm.add_user("small", ColaConfig(target_modules=targets, adapter="lowrank", rank=2, alpha=4.0))
    cm.add_user("full", ColaConfig(target_modules=targets, adapter="linear"))
    for i, a in enumerate([*cm.user_adapters("small").values(), *cm.user_adapters("full").values()]):
        randomize_(a, std=0.1, seed=i)
    users = ["small", "default", "full", "small"]
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)):
        with torch.no_grad():
            routed = cm.generate(**prompt(), users=users, **kw, **GEN)
            alone = {u: cm.generate(**prompt(), users=[u] * len(users), **kw, **GEN) for u in set(users)}
        k = kw.get("num_return_sequences", 1)  # output rows per input row
        for i, u in enumerate(users):
            assert torch.equal(routed[i * k:(i + 1) * k], alone[u][i * k:(i + 1) * k]), (kw, i, u)
        assert len({tuple(alone[u].flatten().tolist()) for u in alone}) == 3  # the users differ
