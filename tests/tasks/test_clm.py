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


def learnt_text(task, feature) -> list[str]:
    """The learnt runs of a feature's labels, decoded."""
    runs, run = [], []
    for label in feature["labels"] + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs, run = runs + [task.tokenizer.decode(run)], []
    return runs


def test_clm_learns_every_assistant_turn_of_weight_1(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    question = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
                {"role": "assistant", "content": "i am a tiny bot", "weight": 1},
                {"role": "user", "content": "do you like films"},
                {"role": "assistant", "content": "no", "weight": 0},
                {"role": "user", "content": "what is your name"}]
    feature = task.encode([{"question": question, "answer": "my name is tiny"}], 128)[0]
    before_1 = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwho are you<|im_end|>\n"
                "<|im_start|>assistant\n")
    turn_1 = "i am a tiny bot<|im_end|>\n"
    before_2 = ("<|im_start|>user\ndo you like films<|im_end|>\n<|im_start|>assistant\nno<|im_end|>\n"
                "<|im_start|>user\nwhat is your name<|im_end|>\n<|im_start|>assistant\n")
    turn_2 = "my name is tiny<|im_end|>\n"
    tokens = [task.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (before_1, turn_1, before_2, turn_2)]
    assert feature["input_ids"] == [t for part in tokens for t in part]
    assert feature["input_ids"] == task.tokenizer(before_1 + turn_1 + before_2 + turn_2,
                                                  add_special_tokens=False)["input_ids"]  # pieces = the whole
    b1, t1, b2, t2 = map(len, tokens)
    assert feature["labels"] == [IGNORE] * b1 + tokens[1] + [IGNORE] * b2 + tokens[3]  # exact positions
    assert learnt_text(task, feature) == [turn_1, turn_2]
    # an assistant turn of a question without a weight is context, as before chat files had weights
    unweighed = [{k: v for k, v in m.items() if k != "weight"} for m in question]
    assert learnt_text(task, task.encode([{"question": unweighed, "answer": "my name is tiny"}], 128)[0]) == [turn_2]


def test_clm_one_answer_encodes_as_a_question_and_answer(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    as_chat = [{"question": [{"role": "user", "content": q}], "answer": a} for q, a in QA]
    assert task.encode(as_chat, 64) == task.encode(qa_records(), 64)
    prompt, answer = task.prompt_and_answer(*QA[0])
    p, a = (task.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, answer))
    assert task.encode(qa_records()[:1], 64)[0]["labels"] == [IGNORE] * len(p) + a


def test_clm_many_turns_without_a_chat_template(tmp_path):
    task = get_task("clm")
    task.load(str(save_tiny_llama(tmp_path, chat_template=False)), qa_records(), seed=0)
    question = [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "a bot", "weight": 1},
                {"role": "user", "content": "what is ai"}]
    assert task.pieces(question, "thinking machines") == [
        ("Question: who are you\nAnswer:", False), (" a bot<|im_end|>", True),
        ("\nQuestion: what is ai\nAnswer:", False), (" thinking machines<|im_end|>", True)]
    feature = task.encode([{"question": question, "answer": "thinking machines"}], 128)[0]
    assert learnt_text(task, feature) == [" a bot<|im_end|>", " thinking machines<|im_end|>"]


def test_clm_truncation_keeps_the_turns_that_fit(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    question = [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "a bot", "weight": 1},
                {"role": "user", "content": "what is ai"}]
    first = task.pieces(question, "x")[:2]
    length = sum(len(task.tokenizer(t, add_special_tokens=False)["input_ids"]) for t, _ in first)
    feature = task.encode([{"question": question, "answer": "ai is the science of thinking machines"}], length)[0]
    assert learnt_text(task, feature) == ["a bot<|im_end|>\n"]


def test_clm_rouge_answers_the_last_learnt_turn(tiny_llama_dir, monkeypatch):
    task = get_task("clm")
    model = task.load(str(tiny_llama_dir), qa_records(), seed=0)
    question = [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "a bot", "weight": 1},
                {"role": "user", "content": "what is ai"}]
    feature = task.encode([{"question": question, "answer": QA[0][1]}], 128)[0]
    prompts = []
    monkeypatch.setattr(task, "generate", lambda cm, p, users=None: prompts.extend(p) or [QA[0][1]])
    assert task.rouge(model, [task.collate([feature])]) == 1.0  # the reference is the last turn only
    answer = task.tokenizer(f"{QA[0][1]}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    last = len(feature["labels"]) - len(answer)
    assert prompts == [feature["input_ids"][:last]]  # the earlier learnt turn is part of the prompt
