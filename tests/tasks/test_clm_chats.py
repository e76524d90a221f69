"""Chat files as OpenAI's fine-tuning data defines them, read by the service and encoded by the clm
task: every weighted assistant turn is learnt (weight 0 masked), content parts are text, and
tool calls, tool turns and tools reach the rendered text: through a template that knows tools,
and in colaft.chats' plain form through one that does not, or without a template."""
from __future__ import annotations

import json

from tiny_models import CHAT_TEMPLATE, qa_records, save_tiny_llama

from colaft.serve import files as datafiles
from colaft.tasks import get_task
from colaft.tasks.clm import IGNORE

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}{% endif %}"
    "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A template that renders tool calls (its source names "tool_calls"), tool turns and tools."""
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
WITH_TOOLS = {"messages": [{"role": "user", "content": "what is the weather in paris"},
                           {"role": "assistant", "content": None, "tool_calls": [CALL]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                           {"role": "assistant", "content": [{"type": "text", "text": "it is "},
                                                             {"type": "text", "text": "sunny"}]}],
              "tools": TOOLS}


def service_features(task, records: list[dict]) -> list[dict]:
    """What the service trains on for an uploaded chat file: parsed, made task records, encoded."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    fmt, checked, labels = datafiles.parse(data, "chat.jsonl")
    return task.encode(datafiles.task_records(fmt, checked, labels), 2048)  # untruncated


def learnt_text(task, feature) -> list[str]:
    """The learnt runs of a feature's labels, decoded."""
    runs, run = [], []
    for label in feature["labels"] + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs, run = runs + [task.tokenizer.decode(run)], []
    return runs


def tokens(task, text: str) -> list[int]:
    return task.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_weighted_assistant_turn_of_an_uploaded_chat_is_learnt(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
                         {"role": "assistant", "content": "i am a tiny bot", "weight": 1},
                         {"role": "user", "content": "do you like films"},
                         {"role": "assistant", "content": "no", "weight": 0},
                         {"role": "user", "content": "what is your name"},
                         {"role": "assistant", "content": [{"type": "text", "text": "my name "},
                                                           {"type": "text", "text": "is tiny"}]},
                         {"role": "user", "content": "thanks"},
                         {"role": "assistant", "content": "welcome", "weight": 0}]}
    feature = service_features(task, [chat])[0]
    assert learnt_text(task, feature) == ["i am a tiny bot<|im_end|>\n", "my name is tiny<|im_end|>\n"]
    text = task.tokenizer.decode(feature["input_ids"])
    assert "<|im_start|>assistant\nno<|im_end|>" in text  # the weight-0 turn is context, not learnt
    masked = [i for i, label in enumerate(feature["labels"]) if label == IGNORE]
    no = tokens(task, "no<|im_end|>\n")
    start = next(i for i in range(len(feature["input_ids"])) if feature["input_ids"][i:i + len(no)] == no)
    assert all(i in masked for i in range(start, start + len(no)))


def test_tool_calls_and_tool_turns_reach_a_template_that_knows_tools(tmp_path):
    task = get_task("clm")
    folder = save_tiny_llama(tmp_path)
    task.load(str(folder), qa_records(), seed=0)
    task.tokenizer.chat_template = TOOL_TEMPLATE
    feature = service_features(task, [WITH_TOOLS])[0]
    text = task.tokenizer.decode(feature["input_ids"])
    assert text.startswith('<|im_start|>system\nTOOLS [{"type": "function", "function": {"name": "weather"')
    assert '<|im_start|>tool\nsunny FOR call_1<|im_end|>' in text
    # the call is a learnt turn, its arguments an object as Hugging Face's templates take them
    assert learnt_text(task, feature) == ['CALL call_1 weather {"city": "paris"}<|im_end|>\n',
                                          "it is sunny<|im_end|>\n"]


def test_a_template_without_tools_gets_the_plain_form(tiny_llama_dir, tmp_path):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    assert task.tokenizer.chat_template == CHAT_TEMPLATE  # renders role and content only
    feature = service_features(task, [WITH_TOOLS])[0]
    text = task.tokenizer.decode(feature["input_ids"])
    assert text.startswith('<|im_start|>system\n<tools>[{"type": "function", "function": {"name": "weather"')
    assert '<|im_start|>user\n<tool_response id="call_1">sunny</tool_response><|im_end|>' in text
    assert learnt_text(task, feature) == [
        '<tool_call>{"id": "call_1", "name": "weather", "arguments": {"city": "paris"}}</tool_call><|im_end|>\n',
        "it is sunny<|im_end|>\n"]
    # without a template: the same plain form in "Role: text" lines
    task.load(str(save_tiny_llama(tmp_path, chat_template=False)), qa_records(), seed=0)
    legacy = {"messages": [{"role": "user", "content": "weather in paris"},
                           {"role": "assistant", "function_call": {"name": "weather", "arguments": "{}"}},
                           {"role": "function", "name": "weather", "content": "sunny"},
                           {"role": "assistant", "content": "sunny"}],
              "functions": [TOOLS[0]["function"]]}
    feature = service_features(task, [legacy])[0]
    text = task.tokenizer.decode(feature["input_ids"])
    assert text.startswith('System: <tools>[{"type": "function"')
    assert 'Question: <tool_response name="weather">sunny</tool_response>\nAnswer: sunny' in text
    assert learnt_text(task, feature) == [' <tool_call>{"name": "weather", "arguments": {}}</tool_call><|im_end|>',
                                          " sunny<|im_end|>"]
