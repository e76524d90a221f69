"""colaft.data: the built-in datasets, user files, field renaming, users, and the split."""
from __future__ import annotations

import gzip
import struct
from collections import Counter

import numpy as np
import pytest
from tiny_models import review_records, write_jsonl

from colaft import data


# ---------------------------------------------------------------- built-ins
def test_rotten_tomatoes_reviews_only_unique_and_labelled():
    records = data.load("rotten-tomatoes")
    texts = [r["text"] for r in records]
    assert len(records) == 12752  # 12808 review snippets less 56 repeated texts; 1097 plots dropped
    assert len(set(texts)) == len(texts)
    assert {r["label"] for r in records} == {0, 1}
    assert sum(r["label"] for r in records) == 7368  # fresh: the majority class is 57.8%
    assert records[0] == {"text": "A three-hour cinema master class.", "label": 1}


def test_chatterbot_pairs_from_builtin_corpus():
    records = data.load("chatterbot")
    assert len(records) == 2306  # ~90 more if the malformed string entry in trivia.yml were split into letters
    assert records[0] == {"question": "What is AI?", "topic": "ai", "answer":
                          "Artificial Intelligence is the branch of engineering and science devoted to "
                          "constructing machines that think."}
    assert len({r["topic"] for r in records}) == 21  # one per file


def test_chatterbot_consecutive_turns_make_pairs(tmp_path, monkeypatch):
    english = tmp_path / "data" / "english"
    english.mkdir(parents=True)
    (english / "small.yml").write_text("categories: [x]\nconversations:\n- - Hi\n  - Hello\n  - How are you?\n"
                                       "- - Bye\n  - 42\n- a bare string, as in trivia.yml\n")
    monkeypatch.setattr(data, "package_dir", lambda name: tmp_path)
    assert data.load("chatterbot") == [
        {"question": "Hi", "answer": "Hello", "topic": "small"},
        {"question": "Hello", "answer": "How are you?", "topic": "small"},
        {"question": "Bye", "answer": "42", "topic": "small"},  # YAML numbers become text
    ]


def test_digits_images_in_unit_range():
    records = data.load("digits")
    assert len(records) == 1797
    image = records[0]["image"]
    assert image.shape == (8, 8) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 15 / 16
    assert {r["label"] for r in records} == set(range(10))


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_only_when_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert "fashion-mnist" not in data.builtin_names()
    with pytest.raises(ValueError, match="unknown dataset 'fashion-mnist'"):
        data.load("fashion-mnist")

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7, 3]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:1])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([5]))
    records = data.load("fashion-mnist")
    assert [r["label"] for r in records] == [5, 7, 3]  # t10k sorts before train
    assert records[1]["image"].shape == (28, 28)
    np.testing.assert_allclose(records[1]["image"] * 255, images[0])


# ---------------------------------------------------------------- user files
def test_jsonl_fields_renamed_to_task_fields(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", review_records(1))
    records = data.load(str(path), {"text": "review", "label": "sentiment"}, required=("text", "label"))
    assert records[0] == {"text": "a wonderful film", "label": "pos"}
    assert len(records) == 16


def test_csv_drops_rows_missing_a_required_field(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label,extra\ngood film,1,x\n,0,y\nbad film,,z\nfine,0,\n")
    records = data.load(str(path), required=("text", "label"))
    assert [(r["text"], r["label"]) for r in records] == [("good film", 1), ("fine", 0)]
    assert records[0]["extra"] == "x" and np.isnan(records[1]["extra"])  # only required fields must be there


@pytest.mark.parametrize("name, message", [
    ("no-such-set", "unknown dataset 'no-such-set'.*rotten-tomatoes, chatterbot, digits"),
    ("missing.jsonl", "does not exist"),
    ("notes.txt", "give a .jsonl or .csv file"),
])
def test_bad_dataset_names(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        data.load(name if "." not in name else str(tmp_path / name))


def test_empty_files_are_rejected(tmp_path):
    for path in (tmp_path / "empty.csv", tmp_path / "empty.jsonl"):
        path.write_text("")
        with pytest.raises(ValueError, match="has no records"):
            data.load(str(path))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="has no records"):
        data.load(str(tmp_path / "header.csv"))


def test_absent_fields_are_named_with_the_present_ones(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", review_records(1))
    with pytest.raises(ValueError, match=r"field 'body' \(for text\) is not in .*its fields are review, sentiment"):
        data.load(str(path), {"text": "body"}, required=("text",))
    with pytest.raises(ValueError, match=r"no field 'text'; its fields are review, sentiment"):
        data.load(str(path), required=("text", "label"))


def test_unreadable_file_is_a_value_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="cannot read it"):
        data.load(str(path))


# ---------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_complete():
    records = list(range(100))
    train, held_out = data.split(records, 0.1, seed=3)
    assert len(train) == 90 and len(held_out) == 10
    assert sorted(train + held_out) == records
    assert data.split(records, 0.1, seed=3) == (train, held_out)
    assert data.split(records, 0.1, seed=4)[1] != held_out
    assert len(data.split(records, 25, seed=0)[1]) == 25


def test_split_keeps_both_sides_non_empty():
    assert data.split([1, 2], 0.01, seed=0)[1] in ([1], [2])
    assert len(data.split([1, 2, 3], 0.99, seed=0)[0]) == 1
    with pytest.raises(ValueError, match="at least 2 records"):
        data.split([1], 0.1)


# ---------------------------------------------------------------- users
def test_user_field_becomes_the_records_user_as_text(tmp_path):
    rows = [{"review": r["review"], "sentiment": r["sentiment"], "author": [7, 8][i % 2], "user": "x"}
            for i, r in enumerate(review_records(1))]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    records = data.load(str(path), {"text": "review"}, ("text",), user_field="author")
    assert [r["user"] for r in records[:3]] == ["7", "8", "7"]  # ids are text; the old "user" column is gone
    assert set(records[0]) == {"text", "sentiment", "user"}
    assert "user" not in data.load(str(path), {"text": "review"}, ("text",))[0]  # no user_field: no users
    assert data.load(str(path), user_field="user")[0]["user"] == "x"


def test_user_field_absent_or_empty_is_named(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", review_records(1))
    with pytest.raises(ValueError, match=r"field 'who' \(for user\) is not in .*its fields are review, sentiment"):
        data.load(str(path), user_field="who")
    csv = tmp_path / "r.csv"
    csv.write_text("text,label,who\ngood,1,ann\nbad,0,\nfine,1, \nok,0,bob\n")
    with pytest.raises(ValueError, match=r"user field 'who' is empty in 2 of 4 records of .*r.csv' \(records 2, 3, "
                                         r"counting from 1\)"):
        data.load(str(csv), required=("text", "label"), user_field="who")


def test_chatterbot_topics_as_users():
    records = data.load("chatterbot", required=("question", "answer"), user_field="topic")
    users = Counter(r["user"] for r in records)
    assert len(users) == 21 and users["tech_support"] == 1050 and users["health"] == 8  # one user per file
    assert set(records[0]) == {"question", "answer", "user"}  # the topic became the user
    assert [r["user"] for r in records] == [r["topic"] for r in data.load("chatterbot")]


def test_assign_users_is_deterministic_and_even():
    records = [{"i": i} for i in range(10)]
    dealt = data.assign_users(records, 3, seed=0)
    assert [r["i"] for r in dealt] == list(range(10)) and "user" not in records[0]  # copies, in order
    assert sorted(Counter(r["user"] for r in dealt).values()) == [3, 3, 4]
    assert data.assign_users(records, 3, seed=0) == dealt
    assert data.assign_users(records, 3, seed=1) != dealt
    assert {r["user"] for r in data.assign_users(records * 2, 12)} == {f"user{i:02d}" for i in range(1, 13)}
    for k in (0, 11):
        with pytest.raises(ValueError, match=f"cannot deal 10 records out to {k} users"):
            data.assign_users(records, k)


def test_split_keeps_every_user_on_both_sides():
    sizes = {"a": 2, "b": 3, "c": 15, "d": 80}
    records = [{"i": i, "user": u} for u, n in sizes.items() for i in range(n)]
    train, held_out = data.split(records, 0.1, seed=0)
    assert sorted(map(str, train + held_out)) == sorted(map(str, records))
    assert Counter(r["user"] for r in held_out) == {"a": 1, "b": 1, "c": 2, "d": 8}  # round(10%), at least 1
    assert data.split(records, 0.1, seed=0) == (train, held_out)
    assert data.split(records, 0.1, seed=1) != (train, held_out)
    assert Counter(r["user"] for r in data.split(records, 0.99, seed=0)[0]) == {u: 1 for u in sizes}  # never all
    # without users, or not stratified, the split is the plain one
    plain = [{"i": i} for i in range(100)]
    assert data.split(plain, 0.1, seed=3) == data.split(plain, 0.1, seed=3, stratify=None)
    assert data.split(plain, 0.1, seed=3)[1] == [plain[i] for i in data.split(list(range(100)), 0.1, seed=3)[1]]
    with pytest.raises(ValueError, match=r"user 'e' has a single record: each needs 2 or more"):
        data.split(records + [{"i": 0, "user": "e"}], 0.1)


def test_a_column_named_like_a_field_another_column_fills_is_dropped(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a title", "review": "a wonderful film", "label": 1}])
    assert data.load(str(path), {"text": "review"}) == [{"text": "a wonderful film", "label": 1}]
