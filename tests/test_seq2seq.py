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
from conftest import Backprop, flat_state, make_opt, max_rel_err, max_update_rel_err, randomize_
from test_engine_exactness import LR, TOL, PeftTwin, _flat
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from colaft import ColaConfig, ColaModel, Trainer

VOCAB, DIM, SEQ = 40, 16, 6
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
