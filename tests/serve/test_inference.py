"""Inference (colaft.serve.inference), through the real server: requests for several adapters
and the base model batched together answer as they do one by one; a classification job's
model answers with its labels, which its adapters' downloads name too.
"""
from __future__ import annotations

import io
import json
import threading
import zipfile

from serve_helpers import CHAT, REVIEWS, upload, wait_job
from tiny_models import BAD, GOOD, QA


def test_classification_job_and_completions(server, bob):
    f = upload(bob, REVIEWS * 2, "reviews.jsonl")
    valid = upload(bob, REVIEWS, "valid.jsonl")
    job = bob.fine_tuning.jobs.create(model="bert", training_file=f.id, validation_file=valid.id,
                                      hyperparameters={"n_epochs": 3, "batch_size": 8,
                                                       "learning_rate_multiplier": 10})
    job = wait_job(bob, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in bob.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Validation: loss=") and "accuracy=" in m for m in messages)
    for used in (f, valid):  # a finished job needs its files no more
        assert bob.files.delete(used.id).deleted
    labels = {bob.completions.create(model=job.fine_tuned_model, prompt=t).choices[0].text for t in GOOD + BAD}
    assert labels <= {"pos", "neg"}
    chat = bob.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": GOOD[0]}])
    assert chat.choices[0].message.content in {"pos", "neg"}
    assert job.model_extra["colaft"]["labels"] == ["neg", "pos"]  # head output i means labels[i]
    for fmt, name in (("colaft", "colaft_config.json"), ("peft", "colaft_labels.json")):
        with server.http(server.keys["bob"]) as h:
            r = h.get(f"/v1/fine_tuning/jobs/{job.id}/adapter?format={fmt}")
        assert r.status_code == 200, r.text
        saved = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read(name))
        assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}


def test_inference_batches_rows_of_different_adapters(server, alice, bob):
    """Requests for the base model and two fine-tuned models, sent at once, answer as they do one by one."""
    jobs = []
    for client, adapter in ((alice, "lowrank"), (bob, "mlp")):
        f = upload(client, CHAT)
        jobs.append(client.fine_tuning.jobs.create(model="llama", training_file=f.id, extra_body={
            "colaft": {"adapter": adapter}}, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 20}))
    ma, mb = (wait_job(c, j.id).fine_tuned_model for c, j in zip((alice, bob), jobs))
    asks = [(alice, "llama", q) for q, _ in QA[:3]] + [(alice, ma, q) for q, _ in QA] + [(bob, mb, q) for q, _ in QA]

    def ask(client, model, question):
        return client.chat.completions.create(model=model, max_tokens=5,
                                              messages=[{"role": "user", "content": question}]
                                              ).choices[0].message.content
    one_by_one = [ask(*a) for a in asks]
    together = [None] * len(asks)

    def worker(i):
        together[i] = ask(*asks[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == one_by_one
    assert one_by_one[:3] != one_by_one[3:6] or one_by_one[:3] != one_by_one[9:12]  # the adapters do act
