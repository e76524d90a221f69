"""The example files of examples/data (README "Data formats") each train through the service:
uploaded as they are, a fine-tuning job on them succeeds. Images are not served: their file is
refused with the line that says why."""
from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import wait_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize("name, model", [("chat.jsonl", "llama"), ("prompt.jsonl", "llama"),
                                         ("reviews.csv", "bert"), ("reviews.jsonl", "bert")])
def test_each_example_trains_through_the_service(server, alice, name, model):
    f = alice.files.create(file=(name, (EXAMPLES / name).read_bytes()), purpose="fine-tune")
    assert (f.filename, f.bytes) == (name, (EXAMPLES / name).stat().st_size)
    with server.http(server.keys["alice"]) as h:
        content = h.get(f"/v1/files/{f.id}/content")
        assert content.content == (EXAMPLES / name).read_bytes()
        assert content.headers["content-type"].startswith("text/csv" if name.endswith(".csv") else "application/jsonl")
    job = alice.fine_tuning.jobs.create(model=model, training_file=f.id, hyperparameters={"n_epochs": 1})
    job = wait_job(alice, job.id)
    assert job.status == "succeeded", job.error


def test_image_files_are_not_served(server):
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/files", files={"file": ("images.csv", (EXAMPLES / "images.csv").read_bytes())},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("images.csv: line 2: a record needs \"messages\" (chat)")
