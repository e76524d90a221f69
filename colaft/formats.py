"""Data files as task records: the one set of formats `colaft train --data` and the service read.

A file is JSONL (one JSON object a line) or CSV (a header row, then one record a row), told
apart by its name (.jsonl, .json, .csv) or, without one, by its first character ("{": JSONL).
Every record of a file has one format, recognised by its fields:

    chat            {"messages": [{"role": "system" | "developer" | "user" | "assistant" | "tool" | "function",
                                   "content": text, or a list of {"type": "text", "text": ...} parts,
                                   "weight": 0 | 1 (assistant turns only)}, ...], "tools": [...]}
                    every assistant turn is learnt unless its weight is 0; tool calls, tool
                    turns and tools as OpenAI's fine-tuning data has them (colaft.chats)     -> clm
    prompt          {"prompt": text, "completion": text} (or "question", "answer")         -> clm
    classification  {"text": text, "label": text or an integer}                             -> sc
    image           {"image": a path relative to the file, or nested lists of pixels,
                     "label": text or an integer}; also a folder of one subfolder per class -> ic

Errors are one line: `DataError` (a ValueError) names the line, counting from 1, and the field.
Pixels are decoded with Pillow (`load_image`) when the task knows the size its model takes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from colaft import chats

ROLES = chats.ROLES
FORMATS = ("chat", "prompt", "classification", "image")
TASK_OF_FORMAT = {"chat": "clm", "prompt": "clm", "classification": "sc", "image": "ic"}
_INT = re.compile(r"[+-]?\d+")


class DataError(ValueError):
    """The data breaks a rule; the message names the line (or the file) and the field."""


# ------------------------------------------------------------------ rows of a file
def kind_of(name: str, data: bytes) -> str:
    """"jsonl" or "csv": by the name's extension, else by the first character that is not blank."""
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json", ".csv"):
        return "csv" if suffix == ".csv" else "jsonl"
    return "jsonl" if data.lstrip()[:1] == b"{" else "csv"


def rows_of(data: bytes, kind: str) -> list[tuple[int, dict]]:
    """(line number, record) of every record of a JSONL or CSV file; blank lines are skipped.

    CSV cells are text, except a column whose every filled cell is an integer (ints), and an
    empty cell is NaN (as pandas reads it: a field the record lacks).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"line {line}: not UTF-8 text") from None
    return _jsonl_rows(text) if kind == "jsonl" else _csv_rows(text)


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSONL record may have (a chat record needs 4): deeper
lines are refused before parsing, which would otherwise recurse until Python's stack limit."""


def too_deep(line: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `line` nests arrays/objects deeper than `limit` (brackets inside strings ignored)."""
    depth, in_string, escaped = 0, False, False
    if line.count("[") + line.count("{") <= limit:  # the common case: no scan
        return False
    for char in line:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _jsonl_rows(text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if too_deep(line):
            raise DataError(f"line {number}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"line {number}: expected a JSON object, got {type(record).__name__}")
        rows.append((number, record))
    return rows


def _csv_rows(text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text))
    header, rows, start = None, [], 1
    try:
        for cells in reader:
            number, start = start, reader.line_num + 1  # a quoted cell may span lines: its first one
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                if len(set(header)) < len(header) or "" in header:
                    raise DataError(f"line {number}: the header needs distinct, non-empty column names")
                continue
            if len(cells) != len(header):
                raise DataError(f"line {number}: {len(cells)} cells, but the header has {len(header)} columns")
            rows.append((number, dict(zip(header, cells))))
    except csv.Error as e:
        raise DataError(f"line {reader.line_num}: not valid CSV ({e})") from None
    for column in header or []:
        filled = [r[column] for _, r in rows if r[column] != ""]
        numbers = filled and all(_INT.fullmatch(v.strip()) for v in filled)
        for _, r in rows:
            v = r[column]
            r[column] = math.nan if v == "" else int(v) if numbers else v
    return rows


# ------------------------------------------------------------------ formats
def missing(value) -> bool:
    """An absent value: None, NaN (an empty CSV cell) or blank text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def record_format(row: Mapping, task_fields: bool = True) -> str | None:
    """The format whose fields the record has, or None; `task_fields`: "question" and "answer"
    (the clm task's own fields, which `colaft train` reads) count as a prompt and completion."""
    if "messages" in row:
        return "chat"
    if "image" in row:
        return "image"
    if {"prompt", "completion", *(("question", "answer") if task_fields else ())} & row.keys():
        return "prompt"
    if "text" in row or "label" in row:
        return "classification"
    return None


def needed(fmt: str, row: Mapping) -> tuple[str, ...]:
    """The fields a record of `fmt` must fill."""
    if fmt == "prompt":
        return ("prompt", "completion") if "prompt" in row or "completion" in row else ("question", "answer")
    return {"chat": ("messages",), "classification": ("text", "label"), "image": ("image", "label")}[fmt]


def _text(value, what: str, line: int) -> str:
    """Text, or a number written as text (a CSV column of numbers); else a DataError."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not missing(value):
        return str(value)
    raise DataError(f"line {line}: {what} must be non-empty text")


def _label(value, line: int):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or missing(value):
        raise DataError(f"line {line}: \"label\" must be text or an integer")
    return value


def _messages(value, line: int) -> list[dict]:
    """Checked chat messages (colaft.chats.messages), or a DataError naming the line."""
    try:
        return chats.messages(value)
    except ValueError as e:
        raise DataError(f"line {line}: {e}") from None


def check(fmt: str, row: Mapping, line: int) -> dict:
    """The record's fields of `fmt`, checked and tidied (chat content as text, weights set);
    other fields of the row (a user column, say) are kept."""
    if fmt == "chat":
        try:
            tools = chats.tools(row)
        except ValueError as e:
            raise DataError(f"line {line}: {e}") from None
        rest = {k: v for k, v in row.items() if k not in ("tools", "functions")}
        return {**rest, "messages": _messages(row["messages"], line), **({"tools": tools} if tools else {})}
    if fmt == "prompt":
        a, b = needed(fmt, row)
        if a == "question" and isinstance(row.get(a), list):  # the clm task's own form: a conversation
            return {**row, b: _text(row.get(b), f'"{b}"', line)}
        if not all(isinstance(row.get(k), (str, int, float)) and not missing(row.get(k)) for k in (a, b)):
            raise DataError(f"line {line}: \"{a}\" and \"{b}\" must both be text")
        return {**row, a: _text(row[a], f'"{a}"', line), b: _text(row[b], f'"{b}"', line)}
    if fmt == "classification":
        return {**row, "text": _text(row.get("text"), '"text"', line), "label": _label(row.get("label"), line)}
    image = row.get("image")
    if not (isinstance(image, list) or isinstance(image, str) and image.strip()):
        raise DataError(f"line {line}: \"image\" must be a file's path or a list of pixel rows")
    return {**row, "label": _label(row.get("label"), line)}


def labels_of(records: list[dict]) -> list:
    """The sorted labels of classification or image records; one kind, text or integers."""
    found = {r["label"] for r in records}
    if len({type(v) for v in found}) > 1:
        raise DataError("labels mix text and integers; use one kind")
    return sorted(found)


def parse(data: bytes, name: str = "", formats: Collection[str] = FORMATS) -> tuple[str, list[dict], list | None]:
    """Check a whole file (JSONL or CSV, see `kind_of`): every record of one format in `formats`
    (a prompt's fields are "prompt" and "completion" here, as in the service's API).

    Returns:
        (format, checked records in the file's fields, sorted labels of a classification file).
    Raises:
        DataError: the first broken line, a file without records, or mixed labels.
    """
    fmt, records = None, []
    for line, row in rows_of(data, kind_of(name, data)):
        kind = record_format(row, task_fields=False)
        if kind is None or kind not in formats:
            raise DataError(f"line {line}: {_wanted(formats)}")
        if fmt is not None and kind != fmt:
            raise DataError(f"line {line}: a {kind} record in a {fmt} file (every line must have one format)")
        fmt = kind
        records.append(check(kind, row, line))
    if not records:
        raise DataError("the file holds no record")
    return fmt, records, labels_of(records) if fmt == "classification" else None


def _wanted(formats: Collection[str]) -> str:
    shapes = {"chat": "\"messages\" (chat)", "prompt": "\"prompt\" and \"completion\"",
              "classification": "\"text\" and \"label\" (classification)", "image": "\"image\" and \"label\""}
    names = [shapes[f] for f in FORMATS if f in formats]
    return "a record needs " + (", ".join(names[:-1]) + ", or " + names[-1] if len(names) > 1 else names[0])


def task_records(fmt: str, records: list[dict], labels: list | None = None, base: Path | None = None) -> list[dict]:
    """Checked records of `fmt` in the fields their task reads; other fields are kept.

    clm {"question", "answer"}: a chat's question is the conversation before its last learnt
    answer (assistant turns in it keep their "weight": 1 learnt, 0 context); the turns after
    that answer are dropped, as nothing learnt depends on them in a causal LM. The answer is its
    text, or the whole message when it calls tools; a chat's "tools" are kept. sc {"text",
    "label"}, ic {"image", "label"}: with `labels`, a label becomes its index in them. An image
    path is taken relative to `base` (the file's folder).
    """
    index = {label: i for i, label in enumerate(labels)} if labels is not None else None
    out = []
    for number, r in enumerate(records, 1):
        if fmt == "chat":
            messages = _messages(r["messages"], number)  # as `check` leaves them (unchanged if checked)
            last = max(i for i, m in enumerate(messages) if m.get("weight"))
            rest = {k: v for k, v in r.items() if k != "messages"}
            answer = messages[last]
            out.append({"question": messages[:last], "answer": answer if chats.calls(answer) else answer["content"],
                        **rest})
        elif fmt == "prompt":
            a, b = needed(fmt, r)
            rest = {k: v for k, v in r.items() if k not in (a, b)}
            out.append({"question": r[a], "answer": r[b], **rest})
        else:
            record = dict(r) if index is None else {**r, "label": index[r["label"]]}
            if fmt == "image" and isinstance(record["image"], str):
                record["image"] = (base or Path()) / record["image"]
            out.append(record)
    return out


# ------------------------------------------------------------------ images
def image_files(folder: Path) -> list[dict]:
    """Image records of a folder of one subfolder per class: {"image": path, "label": subfolder name}.

    Files Pillow does not know by their extension (notes, .DS_Store) are left out.
    """
    from PIL import Image

    known = set(Image.registered_extensions())
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    records = [{"image": f, "label": c.name} for c in classes for f in sorted(c.rglob("*"))
               if f.is_file() and f.suffix.lower() in known]
    if not records:
        raise DataError(f"folder {str(folder)!r} holds no image in a class subfolder (one subfolder per class)")
    return records


def image_info(path: Path) -> tuple[int, tuple[int, int]]:
    """(channels: 1 grey or 3 colour, (width, height)) of an image file, from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3), im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {str(path)!r}: cannot read it ({_reason(e)})") from None


def load_image(path: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image's pixels, (channels, height, width) float32 in [0, 1]: grey or RGB as `channels`
    asks, resized (bilinear) to `size` = (width, height); its own mode and size by default."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            channels = channels or image_info(path)[0]
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {str(path)!r}: cannot read it ({_reason(e)})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
