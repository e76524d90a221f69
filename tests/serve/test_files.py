"""Uploaded data files (colaft.serve.files): formats and labels detected, the broken line named,
records in the tasks' form (a chat's last answer is what a clm job trains on)."""
from __future__ import annotations

import json

import pytest

from colaft.serve import files
from colaft.tasks import get_task


def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
                     {"role": "assistant", "content": "a bot"}]}


def test_parse_detects_the_format_and_the_labels():
    assert files.parse(lines(CHAT, CHAT))[0] == "chat"
    assert files.parse(lines({"prompt": "p", "completion": "c"}))[0] == "prompt"
    fmt, records, labels = files.parse(lines({"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}) + b"\n\n")
    assert (fmt, len(records), labels) == ("classification", 2, ["neg", "pos"])
    assert files.task_records(fmt, records, labels) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    assert files.task_records("chat", [CHAT]) == [{"question": CHAT["messages"][:2], "answer": "a bot"}]


@pytest.mark.parametrize("data, message", [
    (b'{"text": "a", "label": 1}\n{oops}\n', "line 2: not valid JSON"),
    (lines({"text": "a", "label": 1}, {"text": "", "label": 1}), "line 2: \"text\" must be non-empty"),
    (lines({"text": "a", "label": 1.5}), "line 1: \"label\" must be text or an integer"),
    (lines({"text": "a", "label": 1}, {"text": "b", "label": "x"}), "labels mix text and integers"),
    (lines({"messages": [{"role": "assistant", "content": "hi"}]}), "line 1: no user message"),
    (lines({"messages": "hi"}), "line 1: \"messages\" must be a non-empty list"),
    (lines({"prompt": "p"}), "line 1: \"prompt\" and \"completion\" must both be text"),
    (lines(CHAT, {"prompt": "p", "completion": "c"}), "line 2: a prompt record in a chat file"),
    (b"", "no record"),
])
def test_parse_names_the_broken_line(data, message):
    with pytest.raises(files.DataError, match=message):
        files.parse(data)


def test_clm_trains_on_the_last_answer_of_a_conversation(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), [], seed=0)
    record = files.task_records("chat", [CHAT])[0]
    feature = task.encode([record], 64)[0]
    prompt = task.prompt(CHAT["messages"][:2])
    assert prompt.startswith("<|im_start|>system\nbe brief") and prompt.endswith("<|im_start|>assistant\n")
    n_prompt = len(task.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert feature["labels"][:n_prompt] == [-100] * n_prompt
    answer = task.tokenizer.decode([t for t in feature["labels"] if t != -100], skip_special_tokens=True)
    assert answer.strip() == "a bot"


def test_csv_uploads_and_fields_the_task_does_not_read():
    fmt, records, labels = files.parse(b"text,label,user\ngood,pos,mallory\nbad,neg,eve\n", "r.csv")
    assert files.task_records(fmt, records, labels) == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "who are you"}]},
                         {"role": "assistant", "content": "a bot"}], "user": "mallory"}
    assert files.task_records(*files.parse(lines(chat))[:2]) == [
        {"question": [{"role": "user", "content": "who are you"}], "answer": "a bot"}]
    assert files.upload_name(None, b"text,label\n") == "upload.csv"
    assert files.upload_name(None, lines(chat)) == "upload.jsonl" and files.upload_name("a.txt", b"") == "a.txt"


def test_json_nested_deeper_than_the_limit_is_refused_with_its_line():
    ok = lines({"text": "fine", "label": "a"})
    deep = lambda n: ('{"text": "x", "label": "a", "extra": ' + "[" * n + "]" * n + "}").encode()
    brackets_in_text = lines({"text": "[" * 100 + "{", "label": "b"})  # inside a string: not nesting
    assert len(files.parse(ok + deep(31) + b"\n" + brackets_in_text)[1]) == 3
    for n in (32, 100_000):  # one level past the limit (the record's own object counts); past Python's stack
        with pytest.raises(files.DataError, match="line 2: JSON nested deeper than 32 levels"):
            files.parse(ok + deep(n))
