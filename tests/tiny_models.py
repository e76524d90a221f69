"""Tiny model folders for the task and CLI tests (random weights, real tokenizers, no network), and their records.

Imported by the test modules (pytest puts tests/ on sys.path); the fixtures are
session-scoped because writing a folder costs a second or so.
"""
from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from colaft import data
from colaft.assets import resolve_model

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]

# Reviews and Q/A pairs small enough to learn in a few steps.
GOOD = ["a wonderful film", "great acting and a great story", "moving and funny", "a joy to watch",
        "brilliant and touching", "wonderful from start to end", "funny great fun", "a great joy"]
BAD = ["a dull mess", "boring and far too long", "awful acting", "a tedious bore", "dull dull dull",
       "awful story and boring", "a mess from start to end", "tedious and awful"]
QA = [("what is ai", "ai is the science of thinking machines"), ("who are you", "i am a tiny bot"),
      ("do you like films", "yes i like films a lot"), ("what is two plus two", "two plus two is four"),
      ("are you happy", "i am happy today"), ("what is your name", "my name is tiny")]


def review_records(n_copies: int = 3) -> list[dict]:
    """Labelled snippets: label "pos" / "neg" (strings, as user files may have)."""
    return [{"review": t, "sentiment": s} for _ in range(n_copies) for t, s in
            [(g, "pos") for g in GOOD] + [(b, "neg") for b in BAD]]


def qa_records() -> list[dict]:
    """The Q/A pairs as records of the clm task."""
    return [{"question": q, "answer": a} for q, a in QA]


def digit_records(n: int = 64) -> list[dict]:
    """The first `n` built-in digits (8x8 images), as records of the ic task."""
    return data.load("digits")[:n]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # train mode == eval mode


def save_tiny_bert(folder):
    """A 2-layer, 16-wide BERT with MiniLM's (real, uncased WordPiece) tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(0)
    BertModel(_bert_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bpe_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the Q/A texts (decoding is lossless), with chat specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [t for pair in QA for t in pair] + ["user assistant"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder, chat_template: bool = True):
    tokenizer = tiny_bpe_tokenizer(chat_template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
