"""Uploaded training data: checked line by line, stored atomically, read back as task records.

Formats (one JSON object a line, every line the same format):

    chat            {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                    the last message is the assistant's answer (the loss is on it); causal LMs
    prompt          {"prompt": "...", "completion": "..."}: one user turn; causal LMs
    classification  {"text": "...", "label": "..." | int}; classification models

A file that breaks a rule is refused whole, with the line that broke it.
"""
from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")
FORMATS_OF_TASK = {"clm": ("chat", "prompt"), "sc": ("classification",)}


class DataError(ValueError):
    """The file breaks a rule; the message names the line."""


def _record_format(record: dict, line: int) -> str:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"line {line}: \"messages\" must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"line {line}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                                "\"content\": text}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"line {line}: the last message must be the assistant's (the answer to learn)")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise DataError(f"line {line}: no user message before the answer")
        return "chat"
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise DataError(f"line {line}: \"prompt\" and \"completion\" must both be text")
        return "prompt"
    if "text" in record or "label" in record:
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise DataError(f"line {line}: \"text\" must be non-empty text")
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"line {line}: \"label\" must be text or an integer")
        return "classification"
    raise DataError(f"line {line}: a record needs \"messages\" (chat), \"prompt\" and \"completion\", "
                    "or \"text\" and \"label\" (classification)")


def parse(data: bytes) -> tuple[str, list[dict], list | None]:
    """Check a JSONL upload. Returns (format, records, sorted labels of a classification file).

    Raises:
        DataError: the first broken line (counting from 1), or an empty file.
    """
    records, fmt = [], None
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"line {number}: not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"line {number}: expected a JSON object, got {type(record).__name__}")
        kind = _record_format(record, number)
        if fmt is not None and kind != fmt:
            raise DataError(f"line {number}: a {kind} record in a {fmt} file (every line must have one format)")
        fmt = kind
        records.append(record)
    if not records:
        raise DataError("the file holds no record")
    labels = None
    if fmt == "classification":
        found = {r["label"] for r in records}
        if len({type(v) for v in found}) > 1:
            raise DataError("labels mix text and integers; use one kind")
        labels = sorted(found)
    return fmt, records, labels


def task_records(fmt: str, records: list[dict], labels: list | None = None) -> list[dict]:
    """Records in the fields a task reads: clm {"question", "answer"} (question: the conversation
    before the answer), sc {"text", "label"} with the label as its index in `labels`."""
    if fmt == "chat":
        return [{"question": r["messages"][:-1], "answer": r["messages"][-1]["content"]} for r in records]
    if fmt == "prompt":
        return [{"question": r["prompt"], "answer": r["completion"]} for r in records]
    index = {label: i for i, label in enumerate(labels)}
    return [{"text": r["text"], "label": index[r["label"]]} for r in records]
