"""Uploaded training data: read by colaft.formats (the formats `colaft train --data` reads too),
checked line by line, stored atomically, read back as task records.

An upload is JSONL or CSV (by its name's extension, else by its first character), every record
in one of the formats a base model of the service trains on:

    chat            {"messages": [{"role": ..., "content": text or text parts, "weight": 0 | 1}, ...]}
                    every assistant turn is learnt unless its weight is 0, tool calls and tool
                    turns rendered by the model's chat template (colaft.chats); causal LMs
    prompt          {"prompt": "...", "completion": "..."}: one user turn; causal LMs
    classification  {"text": "...", "label": "..." | int}; classification models

A file that breaks a rule is refused whole, with the line that broke it.
"""
from __future__ import annotations

from colaft import formats
from colaft.formats import DataError

FORMATS_OF_TASK = {"clm": ("chat", "prompt"), "sc": ("classification",)}
SERVED = ("chat", "prompt", "classification")  # no image task on the service
__all__ = ["FORMATS_OF_TASK", "DataError", "parse", "task_records", "upload_name"]


def upload_name(filename: str | None, data: bytes) -> str:
    """The upload's name, or one whose extension says how its content reads (the file is read
    again by its stored name when a job starts)."""
    return filename or f"upload.{formats.kind_of('', data)}"


def parse(data: bytes, name: str = "") -> tuple[str, list[dict], list | None]:
    """Check an upload named `name`. Returns (format, records, sorted labels of a classification file).

    Raises:
        DataError: the first broken line (counting from 1), or an empty file.
    """
    return formats.parse(data, name, SERVED)


def task_records(fmt: str, records: list[dict], labels: list | None = None) -> list[dict]:
    """Records in the fields a task reads, and no other: clm {"question", "answer"} (a chat's
    question: the conversation before its last learnt answer), sc {"text", "label"} with the
    label as its index in `labels`; a chat's "tools" too. A column such as "user" would route
    rows to users the data names; here every row is the job's."""
    fields = ("text", "label") if fmt == "classification" else ("question", "answer", "tools")
    return [{k: r[k] for k in fields if k in r} for r in formats.task_records(fmt, records, labels)]
