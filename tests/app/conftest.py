"""Fixtures of the command line's tests: one CPU thread, small data files, a tiny `colaft train` run's options."""
from __future__ import annotations

import pytest
from tiny_models import QA, review_records, write_jsonl


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI keeps the test process at one thread


@pytest.fixture
def reviews(tmp_path):
    return write_jsonl(tmp_path / "reviews.jsonl", review_records(3))  # 48 records, "pos"/"neg"


@pytest.fixture
def qa(tmp_path):
    """Questions and answers of two topics (films, maths): the users of a causal-LM run."""
    return write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a, "topic": t}
                                               for t in ("films", "maths") for q, a in QA * 2])


@pytest.fixture
def tiny_args(tiny_bert_dir, reviews):
    """`colaft train` on the reviews with the tiny BERT: 6 steps of 8 rows."""
    return ["train", "--model", str(tiny_bert_dir), "--data", str(reviews), "--text-field", "review",
            "--label-field", "sentiment", "--batch-size", "8", "--lr", "0.01", "--max-steps", "6"]
