"""colaft.tasks.clm, causal language modelling of answers: prompts, which tokens are learnt,
truncation, the metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import QA, qa_records, save_tiny_llama

from colaft import ColaConfig, ColaModel
from colaft.tasks import get_task
from colaft.tasks.clm import IGNORE


def test_clm_loss_only_on_answer_tokens(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    prompt, answer = task.prompt_and_answer("who are you", "i am a tiny bot")
    assert prompt == "<|im_start|>user\nwho are you<|im_end|>\n<|im_start|>assistant\n"
    assert answer == "i am a tiny bot<|im_end|>\n"
    features = task.encode(qa_records()[1:3], max_length=64)
    batch = task.collate(features)
    tok = task.tokenizer
    for row, (ids, labels, mask) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
        learnt = labels != IGNORE
        assert tok.decode(labels[learnt]) == f"{qa_records()[1 + row]['answer']}<|im_end|>\n"
        assert (labels[learnt] == ids[learnt]).all()
        assert tok.decode(ids[~learnt & mask.bool()]).endswith("<|im_start|>assistant\n")
        assert (labels[mask == 0] == IGNORE).all()  # padding is never learnt
    assert (batch["attention_mask"] == 0).any()  # the two examples differ in length


def test_clm_without_chat_template_uses_plain_prompt(tmp_path):
    task = get_task("clm")
    task.load(str(save_tiny_llama(tmp_path, chat_template=False)), qa_records(), seed=0)
    assert task.prompt_and_answer("who are you", "a bot") == ("Question: who are you\nAnswer:", " a bot<|im_end|>")


def test_clm_truncation_drops_examples_without_answer(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    prompt_len = len(task.tokenizer(task.prompt_and_answer("who are you", "x")[0])["input_ids"])
    features = task.encode(qa_records(), max_length=prompt_len + 2)
    assert all(len(f["input_ids"]) <= prompt_len + 2 for f in features)
    assert all(sum(label != IGNORE for label in f["labels"]) >= 1 for f in features)
    with pytest.raises(ValueError, match="leaves no answer token"):
        task.encode(qa_records(), max_length=3)


def test_clm_metrics(tiny_llama_dir, monkeypatch):
    task = get_task("clm")
    model = task.load(str(tiny_llama_dir), qa_records(), seed=0)
    cola = ColaModel(model, ColaConfig(target_modules=["q_proj"]))
    batches = [task.collate(task.encode(qa_records()[i:i + 3], 64)) for i in (0, 3)]
    metrics = task.evaluate(cola, batches)
    with torch.no_grad():  # the token-weighted mean of the shifted next-token loss
        nll = [F.cross_entropy(model(**b).logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum") for b in batches]
    tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    assert metrics["loss"] == pytest.approx(sum(nll).item() / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert 0.0 <= metrics["rougeL"] <= 1.0
    answers = task.generate(cola, [task.tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]] * 2)
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: same prompt, same answer

    # ROUGE-L is computed against the held-out answers, in order.
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: [a for _, a in QA[:len(prompts)]])
    assert task.rouge(cola, batches) == 1.0
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: ["zebra"] * len(prompts))
    assert task.rouge(cola, batches) == 0.0
    monkeypatch.setattr(task, "rouge_examples", 2)  # spread out: rows 0 and 3 of the 6
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: [QA[0][1], QA[3][1]])
    assert task.rouge(cola, batches) == 1.0
